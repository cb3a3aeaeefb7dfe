// Passing calls on to the control plane (the Python service) unchanged.
//
// Every method the data plane does not serve itself, and every inference request it will not
// take (unknown token, bad tensor, a deployment not in the table, a Triton error), goes to the
// control plane as it came: same method, metadata, deadline and bytes. Its answer (status,
// error details, trailing metadata) comes back as it went. So there is one implementation of
// every rule and one error model; the data plane only takes the requests it can prove valid.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>

#include "event_loop.h"
#include "incoming.h"

namespace maas::dataplane {

// Copies what a caller sent (metadata, deadline) onto the context of the call passed on.
void copy_call_context(const grpc::GenericServerContext& from, grpc::ClientContext* to);

// Copies the control plane's trailing metadata into the reply (not grpc's own keys).
void copy_trailers(const grpc::ClientContext& from, grpc::GenericServerContext* to);

// What the caller is told when the control plane's call ended `status` while neither the caller
// nor the data plane cancelled it. A failure of the connection itself (UNAVAILABLE without the
// google.rpc.Status details every answer of the service carries: the control plane died, is
// restarting or never started) and a CANCELLED nobody here asked for (a control plane going
// away cancels the calls it holds) both become UNAVAILABLE saying so: clients retry
// UNAVAILABLE on another replica, and take CANCELLED for their own doing. Whatever the control
// plane answered itself goes on unchanged.
grpc::Status caller_status(const grpc::Status& status);

// A whole call of any kind (unary or streaming) relayed message by message both ways.
class StreamForward : public Operations {
 public:
  // `open_relays` counts the relays alive (a caller that gives up a stream must end both).
  StreamForward(std::unique_ptr<Incoming> incoming, grpc::GenericStub* control_plane,
                grpc::CompletionQueue* queue, std::atomic<int64_t>* open_relays);
  ~StreamForward() override;

 private:
  void on_started(bool ok);
  void on_caller_message(bool ok);
  void on_sent_up(bool ok);
  void on_writes_done(bool ok);
  void on_control_plane_message(bool ok);
  void on_sent_down(bool ok);
  void on_control_plane_status(bool ok);
  void on_finished(bool ok);
  void finish_upstream();

  std::unique_ptr<Incoming> incoming_;
  std::atomic<int64_t>* open_relays_;
  grpc::ClientContext client_context_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> upstream_;
  grpc::ByteBuffer from_caller_;
  grpc::ByteBuffer from_control_plane_;
  grpc::Status status_;
  bool upstream_finishing_ = false;
  bool cancelled_here_ = false;  // the caller gave up (or left) and the relay cancelled upstream
  Step<StreamForward> started_{this, &StreamForward::on_started};
  Step<StreamForward> caller_message_{this, &StreamForward::on_caller_message};
  Step<StreamForward> sent_up_{this, &StreamForward::on_sent_up};
  Step<StreamForward> writes_done_{this, &StreamForward::on_writes_done};
  Step<StreamForward> control_plane_message_{this, &StreamForward::on_control_plane_message};
  Step<StreamForward> sent_down_{this, &StreamForward::on_sent_down};
  Step<StreamForward> control_plane_status_{this, &StreamForward::on_control_plane_status};
  Step<StreamForward> finished_{this, &StreamForward::on_finished};
};

}  // namespace maas::dataplane
