// Relaying calls to the control plane: unary (for declined inference requests) and streams.
#include "forward.h"

namespace maas::dataplane {
namespace {

bool reserved(const std::string& key) {
  return key.rfind("grpc-", 0) == 0 || key[0] == ':' || key == "user-agent" || key == "te" ||
         key == "content-type";
}

}  // namespace

void copy_call_context(const grpc::GenericCallbackServerContext& from, grpc::ClientContext* to) {
  for (const auto& [key, value] : from.client_metadata()) {
    std::string name(key.data(), key.size());
    if (!reserved(name)) to->AddMetadata(name, std::string(value.data(), value.size()));
  }
  to->set_deadline(from.deadline());
}

void copy_trailers(const grpc::ClientContext& from, grpc::GenericCallbackServerContext* to) {
  for (const auto& [key, value] : from.GetServerTrailingMetadata()) {
    std::string name(key.data(), key.size());
    if (!reserved(name)) to->AddTrailingMetadata(name, std::string(value.data(), value.size()));
  }
}

UnaryForward::UnaryForward(grpc::GenericCallbackServerContext* server_context,
                           const grpc::ByteBuffer& request)
    : server_context_(server_context), request_(request) {
  copy_call_context(*server_context, &client_context_);
}

void UnaryForward::start(grpc::GenericStub* control_plane, std::function<void(grpc::Status)> done) {
  control_plane->UnaryCall(&client_context_, server_context_->method(), grpc::StubOptions(),
                           &request_, &response_, std::move(done));
}

StreamForward::StreamForward(grpc::GenericCallbackServerContext* context,
                             grpc::GenericStub* control_plane)
    : context_(context) {
  copy_call_context(*context, &client_context_);
  control_plane->PrepareBidiStreamingCall(&client_context_, context->method(), grpc::StubOptions(),
                                          &upstream_);
  upstream_.StartCall();
  upstream_.StartRead(&from_control_plane_);
  StartRead(&from_caller_);
}

void StreamForward::OnReadDone(bool ok) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (upstream_done_) return;
  if (ok) {
    upstream_.StartWrite(&from_caller_);
  } else {
    upstream_.StartWritesDone();  // the caller half-closed
  }
}

void StreamForward::Upstream::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(owner_->mutex_);
  if (ok && !owner_->upstream_done_) owner_->StartRead(&owner_->from_caller_);
}

void StreamForward::Upstream::OnReadInitialMetadataDone(bool ok) {
  if (!ok) return;
  for (const auto& [key, value] : owner_->client_context_.GetServerInitialMetadata()) {
    std::string name(key.data(), key.size());
    if (!reserved(name))
      owner_->context_->AddInitialMetadata(name, std::string(value.data(), value.size()));
  }
}

void StreamForward::Upstream::OnReadDone(bool ok) {
  if (ok) owner_->StartWrite(&owner_->from_control_plane_);
}

void StreamForward::OnWriteDone(bool ok) {
  if (ok) upstream_.StartRead(&from_control_plane_);
}

void StreamForward::Upstream::OnDone(const grpc::Status& status) {
  {
    std::lock_guard<std::mutex> lock(owner_->mutex_);
    owner_->upstream_done_ = true;
  }
  copy_trailers(owner_->client_context_, owner_->context_);
  owner_->Finish(status);
}

void StreamForward::OnCancel() { client_context_.TryCancel(); }

void StreamForward::OnDone() { delete this; }

}  // namespace maas::dataplane
