// Serving ModelInfer and Predict from the pushed table, with shared calls per Triton model.
#include "infer.h"

#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include <nlohmann/json.hpp>
#include <random>

#include "forward.h"
#include "maas/inference/v1/inference_service.pb.h"

namespace maas::dataplane {
namespace {

constexpr char kDeploymentPrefix[] = "deployments/";
constexpr char kDataTypePrefix[] = "DATA_TYPE_";
constexpr char kEnableEmptyFinalResponse[] = "triton_enable_empty_final_response";

bool parse(const grpc::ByteBuffer& bytes, google::protobuf::Message* message) {
  grpc::ByteBuffer copy(bytes);  // slices are shared, not copied; the original stays for declining
  grpc::ProtoBufferReader reader(&copy);
  return message->ParseFromZeroCopyStream(&reader);
}

void serialize(const google::protobuf::Message& message, grpc::ByteBuffer* bytes) {
  bool own_buffer = false;
  grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(message, bytes,
                                                                             &own_buffer);
}

std::string generated_request_id() {
  thread_local std::mt19937_64 random{std::random_device{}()};
  static const char* kHex = "0123456789abcdef";
  std::string id(32, '0');
  uint64_t bits[2] = {random(), random()};
  for (int i = 0; i < 32; ++i) id[i] = kHex[(bits[i / 16] >> (4 * (i % 16))) & 15];
  return id;
}

std::string metadata_value(const grpc::GenericServerContext& context, const char* key) {
  auto found = context.client_metadata().find(key);
  if (found == context.client_metadata().end()) return "";
  return std::string(found->second.data(), found->second.size());
}

}  // namespace

// -- Counters -----------------------------------------------------------------------------------

void Counters::served(const std::string& deployment_id, double latency_ms) {
  size_t bucket = 0;
  while (bucket < latency_bounds_ms_.size() && latency_ms > latency_bounds_ms_[bucket]) ++bucket;
  std::lock_guard<std::mutex> lock(mutex_);
  auto& counts = by_deployment_[deployment_id];
  counts.served++;
  counts.latency_buckets.resize(latency_bounds_ms_.size() + 1);
  counts.latency_buckets[bucket]++;
  counts.latency_sum_ms += latency_ms;
}

void Counters::used(const std::string& deployment_id, const std::string& version,
                    const std::string& principal, const std::string& tenant, int rows) {
  std::string key = deployment_id + "\n" + version + "\n" + principal + "\n" + tenant;
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = usage_.find(key);
  if (found == usage_.end())
    found = usage_.emplace(key, Usage{deployment_id, version, principal, tenant}).first;
  found->second.requests++;
  found->second.rows += static_cast<uint64_t>(rows > 0 ? rows : 0);
}

void Counters::declined(const std::string& deployment_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  by_deployment_[deployment_id].declined++;
}

std::string Counters::to_json() const {
  nlohmann::json deployments = nlohmann::json::object();
  nlohmann::json usage = nlohmann::json::array();
  uint64_t served = 0, declined = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [key, used] : usage_)
      usage.push_back({{"deployment", used.deployment_id},
                       {"version", used.version},
                       {"principal", used.principal},
                       {"tenant", used.tenant},
                       {"requests", used.requests},
                       {"rows", used.rows}});
    for (const auto& [deployment_id, counts] : by_deployment_) {
      deployments[deployment_id] = {{"served", counts.served},
                                    {"declined", counts.declined},
                                    {"latency_buckets", counts.latency_buckets},
                                    {"latency_sum_ms", counts.latency_sum_ms}};
      served += counts.served;
      declined += counts.declined;
    }
  }
  return nlohmann::json{{"served", served},
                        {"declined", declined},
                        {"triton_calls", triton_calls_.load()},
                        {"open_relays", open_relays_.load()},
                        {"abandoned", abandoned_.load()},
                        {"latency_bounds_ms", latency_bounds_ms_},
                        {"deployments", deployments},
                        {"usage", usage}}
      .dump();
}

// -- SpanBuffer -----------------------------------------------------------------------------------

int64_t unix_nanos(std::chrono::system_clock::time_point time) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
}

void SpanBuffer::record(SpanRecord span) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (spans_.size() == kCapacity) {
    spans_.pop_front();
    dropped_++;
  }
  spans_.push_back(std::move(span));
}

std::string SpanBuffer::drain_json() {
  std::deque<SpanRecord> taken;
  uint64_t dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    taken.swap(spans_);
    dropped = dropped_;
    dropped_ = 0;
  }
  nlohmann::json spans = nlohmann::json::array();
  for (const auto& span : taken)
    spans.push_back({{"traceparent", span.traceparent},
                     {"principal", span.principal},
                     {"sampled", span.sampled},
                     {"method", span.method},
                     {"deployment", span.deployment_id},
                     {"triton_model", span.triton_model},
                     {"outcome", span.outcome},
                     {"start_unix_nanos", span.start_unix_nanos},
                     {"end_unix_nanos", span.end_unix_nanos}});
  return nlohmann::json{{"spans", spans}, {"dropped", dropped}}.dump();
}

// -- DataPlane ----------------------------------------------------------------------------------

DataPlane::DataPlane(std::shared_ptr<grpc::Channel> triton,
                     std::shared_ptr<grpc::Channel> control_plane, std::unique_ptr<TokenTable> tokens,
                     grpc::CompletionQueue* queue)
    : triton_(::inference::GRPCInferenceService::NewStub(triton)),
      control_plane_(control_plane),
      tokens_(std::move(tokens)),
      queue_(queue),
      table_(std::make_shared<RouteTable>()) {}

std::shared_ptr<const RouteTable> DataPlane::table() const {
  std::lock_guard<std::mutex> lock(table_mutex_);
  return table_;
}

void DataPlane::set_table(std::shared_ptr<const RouteTable> table) {
  std::lock_guard<std::mutex> lock(table_mutex_);
  table_ = std::move(table);
}

Lane* DataPlane::lane(const std::string& triton_model) {
  auto& lane = lanes_[triton_model];
  if (!lane) lane = std::make_unique<Lane>(this);
  return lane.get();
}

// -- InferCall: admission -------------------------------------------------------------------

InferCall::InferCall(std::unique_ptr<Incoming> incoming, DataPlane* plane, Protocol protocol)
    : incoming_(std::move(incoming)), plane_(plane), protocol_(protocol) {
  incoming_->on_cancelled([this] { abandoned_ = true; });
  incoming_->stream.Read(&request_bytes_, request_read_.start());
}

void InferCall::record_span(const char* outcome) {
  bool sampled = plane_->spans().take_sample();
  if (traceparent_.empty() && !sampled) return;
  plane_->spans().record({traceparent_, principal_, sampled, incoming_->context.method(),
                          deployment_id_, target_->triton_model, outcome,
                          unix_nanos(accepted_at_), unix_nanos(std::chrono::system_clock::now())});
}

void InferCall::give_up() {
  plane_->counters().abandoned();
  record_span("CANCELLED");
  incoming_->stream.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller gave up"),
                           finished_.start());
}

void InferCall::on_request(bool ok) {
  if (!ok) {
    incoming_->stream.Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request"),
        finished_.start());
    return;
  }
  if (admit()) {
    plane_->lane(target_->triton_model)->submit(this);
  } else {
    decline();
  }
}

bool InferCall::admit() {
  table_ = plane_->table();
  if (!table_->triton_ready) return false;
  if (protocol_ == Protocol::kKServe) {
    ::inference::ModelInferRequest request;
    if (!parse(request_bytes_, &request)) return false;
    auto route = table_->routes.find(request.model_name());
    if (route == table_->routes.end()) return false;
    deployment_id_ = route->first;
    if (!authorized(*route->second)) return false;
    triton_request_ = std::move(request);
    return admit_kserve(*route->second);
  }
  maas::inference::v1::PredictRequest request;
  if (!parse(request_bytes_, &request)) return false;
  const std::string& name = request.deployment();
  if (name.rfind(kDeploymentPrefix, 0) != 0) return false;
  auto route = table_->routes.find(name.substr(sizeof(kDeploymentPrefix) - 1));
  if (route == table_->routes.end()) return false;
  deployment_id_ = route->first;
  if (!authorized(*route->second)) return false;
  request_id_ = request.request_id().empty() ? generated_request_id() : request.request_id();
  target_ = &route->second->pick(request_id_);
  triton_request_.set_model_name(target_->triton_model);
  triton_request_.set_id(request_id_);
  std::vector<size_t> byte_lengths;
  for (auto& tensor : *request.mutable_inputs()) {
    auto datatype = maas::common::v1::DataType_Name(tensor.datatype());
    if (datatype.rfind(kDataTypePrefix, 0) != 0) return false;
    auto* input = triton_request_.add_inputs();
    input->set_name(tensor.name());
    input->set_datatype(datatype.substr(sizeof(kDataTypePrefix) - 1));
    *input->mutable_shape() = tensor.shape();
    byte_lengths.push_back(tensor.raw_data().size());
    triton_request_.add_raw_input_contents(std::move(*tensor.mutable_raw_data()));
  }
  for (const auto& output_name : request.output_names()) {
    if (target_->output(output_name) == nullptr) return false;
    triton_request_.add_outputs()->set_name(output_name);
  }
  std::vector<const ::inference::ModelInferRequest::InferInputTensor*> inputs;
  for (const auto& input : triton_request_.inputs()) inputs.push_back(&input);
  return matches_signature(inputs, byte_lengths);
}

bool InferCall::admit_kserve(const Route& route) {
  auto& request = triton_request_;
  request_id_ = request.id().empty() ? generated_request_id() : request.id();
  target_ = &route.pick(request_id_);
  // Triton's flag for streams, which perf_analyzer (and tritonclient) put on every request:
  // it means nothing to a unary call, so it does not make a request the data plane's to decline.
  request.mutable_parameters()->erase(kEnableEmptyFinalResponse);
  if (!request.model_version().empty() || request.parameters_size() > 0 ||
      request.raw_input_contents_size() != request.inputs_size())
    return false;
  std::vector<const ::inference::ModelInferRequest::InferInputTensor*> inputs;
  std::vector<size_t> byte_lengths;
  for (int i = 0; i < request.inputs_size(); ++i) {
    const auto& input = request.inputs(i);
    if (input.parameters_size() > 0 || input.has_contents()) return false;
    inputs.push_back(&input);
    byte_lengths.push_back(request.raw_input_contents(i).size());
  }
  for (const auto& output : request.outputs())
    if (output.parameters_size() > 0 || target_->output(output.name()) == nullptr) return false;
  request.set_model_name(target_->triton_model);
  return matches_signature(inputs, byte_lengths);
}

bool InferCall::authorized(const Route& route) {
  TokenTable* tokens = plane_->tokens();
  if (tokens == nullptr) return !relayed_for_admission();
  auto scopes = tokens->scopes_for(metadata_value(incoming_->context, "authorization"),
                                   &principal_, &tenant_);
  if (scopes == nullptr) return false;
  for (const auto& target : route.targets)
    if (!TokenTable::covers(*scopes, target.model_id)) return false;
  return !relayed_for_admission();
}

bool InferCall::relayed_for_admission() const {
  return table_->relay_all || table_->relay_tenants.count(tenant_) > 0;
}

bool InferCall::matches_signature(
    const std::vector<const ::inference::ModelInferRequest::InferInputTensor*>& inputs,
    const std::vector<size_t>& byte_lengths) {
  const Target& target = *target_;
  if (inputs.size() != target.inputs.size()) return false;
  int64_t batch = -1;
  std::string key;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& input = *inputs[i];
    const TensorSpec* spec = target.input(input.name());
    if (spec == nullptr || input.datatype() != spec->datatype) return false;
    for (size_t j = 0; j < i; ++j)
      if (inputs[j]->name() == input.name()) return false;
    if (input.shape_size() != static_cast<int>(spec->shape.size()) + 1) return false;
    int64_t rows = input.shape(0);
    if (rows < 1 || rows > target.max_batch_size || (batch != -1 && rows != batch)) return false;
    batch = rows;
    uint64_t elements = static_cast<uint64_t>(rows);
    key += input.name() + ":" + input.datatype();
    for (size_t d = 0; d < spec->shape.size(); ++d) {
      int64_t got = input.shape(static_cast<int>(d) + 1);
      if (got < 0 || (spec->shape[d] != -1 && spec->shape[d] != got)) return false;
      elements *= static_cast<uint64_t>(got);
      key += "," + std::to_string(got);
    }
    if (byte_lengths[i] != elements * spec->item_bytes) return false;
    key += ";";
  }
  for (const auto& output : triton_request_.outputs()) key += "->" + output.name();
  rows_ = static_cast<int>(batch);
  sharing_key_ = std::move(key);
  traceparent_ = metadata_value(incoming_->context, "traceparent");
  return true;
}

// -- InferCall: answers ---------------------------------------------------------------------

void InferCall::reply(const ::inference::ModelInferResponse& response) {
  if (protocol_ == Protocol::kKServe) {
    ::inference::ModelInferResponse answer(response);
    answer.set_model_name(deployment_id_);
    answer.set_model_version(target_->version_number());
    answer.set_id(triton_request_.id());
    serialize(answer, &reply_bytes_);
  } else {
    maas::inference::v1::PredictResponse answer;
    answer.set_request_id(request_id_);
    answer.set_model_version(target_->version);
    for (int i = 0; i < response.outputs_size(); ++i) {
      const auto& output = response.outputs(i);
      auto* tensor = answer.add_outputs();
      tensor->set_name(output.name());
      maas::common::v1::DataType datatype;
      if (!maas::common::v1::DataType_Parse(kDataTypePrefix + output.datatype(), &datatype) ||
          i >= response.raw_output_contents_size()) {
        decline();  // not expressible here: the control plane answers (or explains) it
        return;
      }
      tensor->set_datatype(datatype);
      *tensor->mutable_shape() = output.shape();
      tensor->set_raw_data(response.raw_output_contents(i));
    }
    serialize(answer, &reply_bytes_);
  }
  plane_->counters().served(
      deployment_id_, std::chrono::duration<double, std::milli>(
                          std::chrono::system_clock::now() - accepted_at_).count());
  plane_->counters().used(deployment_id_, target_->version, principal_, tenant_, rows_);
  record_span("OK");
  incoming_->stream.WriteAndFinish(reply_bytes_, grpc::WriteOptions(), grpc::Status::OK,
                                   finished_.start());
}

void InferCall::decline() {
  plane_->counters().declined(deployment_id_);
  forward_context_ = std::make_unique<grpc::ClientContext>();
  copy_call_context(incoming_->context, forward_context_.get());
  forward_ = plane_->control_plane()->PrepareUnaryCall(
      forward_context_.get(), incoming_->context.method(), request_bytes_, plane_->queue());
  forward_->StartCall();
  forward_->Finish(&forward_reply_, &forward_status_, forwarded_.start());
}

void InferCall::on_forwarded(bool) {
  copy_trailers(*forward_context_, &incoming_->context);
  if (forward_status_.ok()) {
    incoming_->stream.WriteAndFinish(forward_reply_, grpc::WriteOptions(), forward_status_,
                                     finished_.start());
  } else {
    incoming_->stream.Finish(caller_status(forward_status_), finished_.start());
  }
}

void InferCall::on_finished(bool) { finished(); }

// -- Lane: shared calls -----------------------------------------------------------------------

namespace {

// One call to Triton on behalf of one or more requests.
class TritonCall : public Operations {
 public:
  TritonCall(Lane* lane, std::vector<InferCall*> batch) : lane_(lane), batch_(std::move(batch)) {}

  void send(::inference::GRPCInferenceService::Stub* triton, grpc::CompletionQueue* queue);

 private:
  void on_answer(bool) {
    lane_->finished(std::move(batch_), status_, response_);
    finished();
  }

  Lane* lane_;
  std::vector<InferCall*> batch_;
  grpc::ClientContext context_;
  ::inference::ModelInferRequest merged_;  // unused when the call carries a single request
  ::inference::ModelInferResponse response_;
  grpc::Status status_;
  std::unique_ptr<grpc::ClientAsyncResponseReader<::inference::ModelInferResponse>> reader_;
  Step<TritonCall> answered_{this, &TritonCall::on_answer};
};

void merge_into(const std::vector<InferCall*>& batch, int rows, ::inference::ModelInferRequest* merged) {
  const auto& head = batch.front()->triton_request();
  merged->set_model_name(head.model_name());
  for (int i = 0; i < head.inputs_size(); ++i) {
    auto* input = merged->add_inputs();
    input->set_name(head.inputs(i).name());
    input->set_datatype(head.inputs(i).datatype());
    *input->mutable_shape() = head.inputs(i).shape();
    input->set_shape(0, rows);
    std::string* contents = merged->add_raw_input_contents();
    for (InferCall* call : batch) contents->append(call->triton_request().raw_input_contents(i));
  }
  *merged->mutable_outputs() = head.outputs();
}

// Each request's share of a reply to merged requests; false when the reply is not batch-major.
bool split(const ::inference::ModelInferResponse& response, const std::vector<InferCall*>& batch,
           int rows, std::vector<::inference::ModelInferResponse>* parts) {
  parts->resize(batch.size());
  for (int i = 0; i < response.outputs_size(); ++i) {
    const auto& output = response.outputs(i);
    if (output.shape_size() == 0 || output.shape(0) != rows ||
        i >= response.raw_output_contents_size())
      return false;
    const std::string& contents = response.raw_output_contents(i);
    if (contents.size() % rows != 0) return false;
    size_t row_bytes = contents.size() / rows, offset = 0;
    for (size_t k = 0; k < batch.size(); ++k) {
      auto* part = (*parts)[k].add_outputs();
      part->set_name(output.name());
      part->set_datatype(output.datatype());
      *part->mutable_shape() = output.shape();
      part->set_shape(0, batch[k]->rows());
      size_t length = row_bytes * batch[k]->rows();
      (*parts)[k].add_raw_output_contents(contents.substr(offset, length));
      offset += length;
    }
  }
  return true;
}

}  // namespace

void TritonCall::send(::inference::GRPCInferenceService::Stub* triton,
                      grpc::CompletionQueue* queue) {
  int rows = 0;
  auto deadline = std::chrono::system_clock::time_point::min();
  for (InferCall* request : batch_) {
    rows += request->rows();
    deadline = std::max(deadline, request->deadline());
  }
  context_.set_deadline(deadline);
  const std::string& traceparent = batch_.front()->traceparent();
  if (!traceparent.empty()) context_.AddMetadata("traceparent", traceparent);
  const ::inference::ModelInferRequest* request = &batch_.front()->triton_request();
  if (batch_.size() > 1) {
    merge_into(batch_, rows, &merged_);
    request = &merged_;
  }
  reader_ = triton->PrepareAsyncModelInfer(&context_, *request, queue);
  reader_->StartCall();
  reader_->Finish(&response_, &status_, answered_.start());
}

void Lane::submit(InferCall* call) {
  if (in_flight_ >= call->max_calls_in_flight()) {
    waiting_.push_back(call);
    return;
  }
  ++in_flight_;
  send({call});
}

void Lane::send(std::vector<InferCall*> batch) {
  plane_->counters().triton_call();
  plane_->triton_call_opened();
  (new TritonCall(this, std::move(batch)))->send(plane_->triton(), plane_->queue());
}

void Lane::finished(std::vector<InferCall*> batch, const grpc::Status& status,
                    const ::inference::ModelInferResponse& response) {
  plane_->triton_call_closed();
  std::vector<InferCall*> next = next_batch();  // Triton gets the next call before replies go
  if (next.empty()) {
    --in_flight_;
  } else {
    send(std::move(next));
  }
  if (!status.ok()) {  // the control plane gives each its canonical answer (or serves it)
    for (InferCall* call : batch) call->decline();
    return;
  }
  if (batch.size() == 1) {
    batch.front()->reply(response);
    return;
  }
  int rows = 0;
  for (InferCall* call : batch) rows += call->rows();
  std::vector<::inference::ModelInferResponse> parts;
  if (!split(response, batch, rows, &parts)) {
    for (InferCall* call : batch) call->decline();
    return;
  }
  for (size_t k = 0; k < batch.size(); ++k) batch[k]->reply(parts[k]);
}

std::vector<InferCall*> Lane::next_batch() {
  std::vector<InferCall*> batch;
  int rows = 0;
  while (!waiting_.empty()) {
    InferCall* call = waiting_.front();
    if (call->abandoned()) {  // its caller has its answer (DEADLINE_EXCEEDED or CANCELLED)
      waiting_.pop_front();
      call->give_up();
      continue;
    }
    if (!batch.empty() && (call->sharing_key() != batch.front()->sharing_key() ||
                           rows + call->rows() > batch.front()->max_batch_size()))
      break;
    rows += call->rows();
    batch.push_back(call);
    waiting_.pop_front();
  }
  return batch;
}

}  // namespace maas::dataplane
