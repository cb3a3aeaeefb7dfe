// The data plane's own work: inference requests it can prove valid go straight to Triton.
//
// A request is served here only when its token is known and scoped to the deployment's
// models, its deployment is in the pushed table, and its tensors match the signature exactly
// (names, datatypes, shapes, byte lengths, batch within max_batch_size). Anything else is
// declined: passed to the control plane unchanged, which answers it (often with the precise
// INVALID_ARGUMENT, UNAUTHENTICATED or NOT_FOUND and its details). A request Triton fails is
// declined too, so the caller gets the control plane's canonical error, never a raw one.
//
// Concurrent requests for one Triton model share calls: each model keeps at most
// `max_calls_in_flight` calls open; requests arriving meanwhile wait and go out together,
// concatenated by rows, and each reply is sliced back (as the Python `RequestCoalescer`).
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "event_loop.h"
#include "grpc_service.grpc.pb.h"
#include "incoming.h"
#include "routes.h"

namespace maas::dataplane {

class InferCall;

// Counts of what the data plane did, reported to the control plane on request. Written by
// the loop thread, read by the control thread.
class Counters {
 public:
  struct PerDeployment {
    uint64_t served = 0;
    uint64_t declined = 0;
    // Latency of served requests (accepted to answered): counts per bucket of
    // `latency_bounds_ms` (the last one above every bound) and their sum.
    std::vector<uint64_t> latency_buckets;
    double latency_sum_ms = 0;
  };

  // Upper bounds (ms, ascending) of the latency histogram; set once before serving.
  void set_latency_bounds(std::vector<double> bounds_ms) { latency_bounds_ms_ = std::move(bounds_ms); }
  // What a principal used on one deployment version: the control plane turns the growth of
  // these counts into usage records.
  struct Usage {
    std::string deployment_id;
    std::string version;
    std::string principal;
    std::string tenant;
    uint64_t requests = 0;
    uint64_t rows = 0;
  };
  void served(const std::string& deployment_id, double latency_ms);
  void used(const std::string& deployment_id, const std::string& version,
            const std::string& principal, const std::string& tenant, int rows);
  void declined(const std::string& deployment_id);  // "" when the request named none we know
  void triton_call() { triton_calls_++; }
  void abandoned() { abandoned_++; }
  std::atomic<int64_t>* open_relays() { return &open_relays_; }
  std::string to_json() const;

 private:
  mutable std::mutex mutex_;
  std::vector<double> latency_bounds_ms_;
  std::unordered_map<std::string, PerDeployment> by_deployment_;
  // key: deployment \n version \n principal \n tenant
  std::unordered_map<std::string, Usage> usage_;
  std::atomic<uint64_t> triton_calls_{0};
  std::atomic<uint64_t> abandoned_{0};
  std::atomic<int64_t> open_relays_{0};
};

// What the control plane needs to emit an OpenTelemetry span for a request served here (the
// data plane exports nothing itself), or an access log line: kept for requests that carry a
// W3C traceparent, and for one in every `access_sample_every` served requests (`sampled`).
struct SpanRecord {
  std::string traceparent;  // the caller's, as it came; may be empty when sampled
  std::string principal;    // the token's principal ("" with auth off)
  bool sampled = false;     // chosen for the access log
  std::string method;       // e.g. "/maas.inference.v1.InferenceService/Predict"
  std::string deployment_id;
  std::string triton_model;
  std::string outcome;  // a gRPC status code name: "OK", "CANCELLED"
  int64_t start_unix_nanos = 0;
  int64_t end_unix_nanos = 0;
};

// Span records waiting for the control plane to take them; at most `kCapacity` (the oldest are
// dropped and counted when it does not come). Written by the loop thread, drained by the
// control thread.
class SpanBuffer {
 public:
  static constexpr size_t kCapacity = 4096;
  // One in every `every` served requests is sampled for the access log (0: none).
  void set_sample_every(uint64_t every) { sample_every_ = every; }
  bool take_sample() { return sample_every_ != 0 && served_seen_.fetch_add(1) % sample_every_ == 0; }
  void record(SpanRecord span);
  std::string drain_json();  // {"spans": [...], "dropped": N}; empties the buffer

 private:
  std::mutex mutex_;
  std::deque<SpanRecord> spans_;
  uint64_t dropped_ = 0;
  uint64_t sample_every_ = 0;
  std::atomic<uint64_t> served_seen_{0};
};

int64_t unix_nanos(std::chrono::system_clock::time_point time);

class DataPlane;

// Requests for one Triton model: at most `max_calls_in_flight` calls open, the rest wait.
// Used by the loop thread only.
class Lane {
 public:
  explicit Lane(DataPlane* plane) : plane_(plane) {}
  void submit(InferCall* call);
  void finished(std::vector<InferCall*> batch, const grpc::Status& status,
                const ::inference::ModelInferResponse& response);

 private:
  void send(std::vector<InferCall*> batch);
  std::vector<InferCall*> next_batch();

  DataPlane* plane_;
  int in_flight_ = 0;
  std::deque<InferCall*> waiting_;
};

// What every inference call needs: the table, tokens, Triton, the control plane, the queue.
class DataPlane {
 public:
  DataPlane(std::shared_ptr<grpc::Channel> triton, std::shared_ptr<grpc::Channel> control_plane,
            std::unique_ptr<TokenTable> tokens, grpc::CompletionQueue* queue);

  std::shared_ptr<const RouteTable> table() const;
  void set_table(std::shared_ptr<const RouteTable> table);  // from the control thread
  Lane* lane(const std::string& triton_model);

  ::inference::GRPCInferenceService::Stub* triton() { return triton_.get(); }
  grpc::GenericStub* control_plane() { return &control_plane_; }
  grpc::CompletionQueue* queue() { return queue_; }
  TokenTable* tokens() { return tokens_.get(); }
  Counters& counters() { return counters_; }
  SpanBuffer& spans() { return spans_; }
  // Calls to Triton open now (the loop stays awake for their answers). Loop thread only.
  int triton_calls_open() const { return triton_calls_open_; }
  void triton_call_opened() { ++triton_calls_open_; }
  void triton_call_closed() { --triton_calls_open_; }

 private:
  std::unique_ptr<::inference::GRPCInferenceService::Stub> triton_;
  grpc::GenericStub control_plane_;
  std::unique_ptr<TokenTable> tokens_;  // nullptr: auth is off
  grpc::CompletionQueue* queue_;
  Counters counters_;
  SpanBuffer spans_;
  int triton_calls_open_ = 0;
  mutable std::mutex table_mutex_;
  std::shared_ptr<const RouteTable> table_;
  std::unordered_map<std::string, std::unique_ptr<Lane>> lanes_;
};

// One ModelInfer (KServe-v2) or Predict call, served here or declined to the control plane.
class InferCall : public Operations {
 public:
  enum class Protocol { kKServe, kPredict };

  InferCall(std::unique_ptr<Incoming> incoming, DataPlane* plane, Protocol protocol);

  // Used by the lane.
  ::inference::ModelInferRequest& triton_request() { return triton_request_; }
  int rows() const { return rows_; }
  const std::string& sharing_key() const { return sharing_key_; }
  int max_batch_size() const { return target_->max_batch_size; }
  int max_calls_in_flight() const { return target_->max_calls_in_flight; }
  std::chrono::system_clock::time_point deadline() const { return incoming_->context.deadline(); }
  const std::string& traceparent() const { return traceparent_; }
  // The caller cancelled or its deadline passed: while still waiting it is never sent.
  bool abandoned() const { return abandoned_; }
  void give_up();
  void reply(const ::inference::ModelInferResponse& response);
  void decline();

 private:
  void on_request(bool ok);
  void on_forwarded(bool ok);
  void on_finished(bool ok);
  bool admit();  // parse, authenticate, route and check; fills triton_request_
  bool admit_kserve(const Route& route);
  bool authorized(const Route& route);
  // Whether the control plane must admit this principal's requests (tenant limits).
  bool relayed_for_admission() const;
  bool matches_signature(
      const std::vector<const ::inference::ModelInferRequest::InferInputTensor*>& inputs,
      const std::vector<size_t>& byte_lengths);
  void record_span(const char* outcome);  // traceparent sent, or sampled for the access log

  std::unique_ptr<Incoming> incoming_;
  DataPlane* plane_;
  Protocol protocol_;
  std::chrono::system_clock::time_point accepted_at_ = std::chrono::system_clock::now();
  grpc::ByteBuffer request_bytes_;
  grpc::ByteBuffer reply_bytes_;
  std::shared_ptr<const RouteTable> table_;  // keeps `target_` alive
  const Target* target_ = nullptr;
  std::string deployment_id_;
  std::string request_id_;
  std::string traceparent_;
  std::string principal_;
  std::string tenant_;  // the token's tenant (its principal when it names none)
  ::inference::ModelInferRequest triton_request_;
  int rows_ = 0;
  std::string sharing_key_;
  bool abandoned_ = false;
  // Declined: the call to the control plane.
  std::unique_ptr<grpc::ClientContext> forward_context_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> forward_;
  grpc::ByteBuffer forward_reply_;
  grpc::Status forward_status_;
  Step<InferCall> request_read_{this, &InferCall::on_request};
  Step<InferCall> forwarded_{this, &InferCall::on_forwarded};
  Step<InferCall> finished_{this, &InferCall::on_finished};
};

}  // namespace maas::dataplane
