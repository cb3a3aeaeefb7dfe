// Passing calls on to the control plane (the Python service) unchanged.
//
// Every method the data plane does not serve itself, and every inference request it will not
// take (unknown token, bad tensor, a deployment not in the table, a Triton error), goes to the
// control plane as it came: same method, metadata, deadline and bytes. Its answer (status,
// error details, trailing metadata) comes back as it went. So there is one implementation of
// every rule and one error model; the data plane only takes the requests it can prove valid.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <mutex>

namespace maas::dataplane {

// Copies what a caller sent (metadata, deadline) onto the context of the call passed on.
void copy_call_context(const grpc::GenericCallbackServerContext& from, grpc::ClientContext* to);

// Copies the control plane's trailing metadata into the reply (not grpc's own keys).
void copy_trailers(const grpc::ClientContext& from, grpc::GenericCallbackServerContext* to);

// Sends one request message to the control plane; `start` calls `done` with its answer.
class UnaryForward {
 public:
  UnaryForward(grpc::GenericCallbackServerContext* server_context, const grpc::ByteBuffer& request);
  void start(grpc::GenericStub* control_plane, std::function<void(grpc::Status)> done);
  grpc::ByteBuffer& response() { return response_; }
  const grpc::ClientContext& client_context() const { return client_context_; }

 private:
  grpc::GenericCallbackServerContext* server_context_;
  grpc::ClientContext client_context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

// A whole call of any kind (unary or streaming) relayed message by message both ways.
class StreamForward : public grpc::ServerGenericBidiReactor {
 public:
  StreamForward(grpc::GenericCallbackServerContext* context, grpc::GenericStub* control_plane);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // The control plane's side of the call.
  class Upstream : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(StreamForward* owner) : owner_(owner) {}
    void OnReadInitialMetadataDone(bool ok) override;
    void OnReadDone(bool ok) override;
    void OnWriteDone(bool ok) override;
    void OnDone(const grpc::Status& status) override;

   private:
    StreamForward* owner_;
  };

  grpc::GenericCallbackServerContext* context_;
  grpc::ClientContext client_context_;
  Upstream upstream_{this};
  grpc::ByteBuffer from_caller_;
  grpc::ByteBuffer from_control_plane_;
  std::mutex mutex_;
  bool upstream_done_ = false;
};

}  // namespace maas::dataplane
