// Relaying calls to the control plane, message by message, on the event loop.
#include "forward.h"

namespace maas::dataplane {
namespace {

bool reserved(const std::string& key) {
  return key.rfind("grpc-", 0) == 0 || key[0] == ':' || key == "user-agent" || key == "te" ||
         key == "content-type";
}

}  // namespace

void copy_call_context(const grpc::GenericServerContext& from, grpc::ClientContext* to) {
  for (const auto& [key, value] : from.client_metadata()) {
    std::string name(key.data(), key.size());
    if (!reserved(name)) to->AddMetadata(name, std::string(value.data(), value.size()));
  }
  to->set_deadline(from.deadline());
}

void copy_trailers(const grpc::ClientContext& from, grpc::GenericServerContext* to) {
  for (const auto& [key, value] : from.GetServerTrailingMetadata()) {
    std::string name(key.data(), key.size());
    if (!reserved(name)) to->AddTrailingMetadata(name, std::string(value.data(), value.size()));
  }
}

grpc::Status caller_status(const grpc::Status& status) {
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE && status.error_details().empty()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "the service behind this gateway is unreachable (" + status.error_message() +
                            "): it is gone or restarting; try another replica");
  }
  if (status.error_code() == grpc::StatusCode::CANCELLED) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "the service behind this gateway ended the call CANCELLED without the caller "
                        "asking (" + status.error_message() + "): it is going away; try another replica");
  }
  return status;
}

StreamForward::StreamForward(std::unique_ptr<Incoming> incoming, grpc::GenericStub* control_plane,
                             grpc::CompletionQueue* queue, std::atomic<int64_t>* open_relays)
    : incoming_(std::move(incoming)), open_relays_(open_relays) {
  ++*open_relays_;
  incoming_->on_cancelled([this] {  // e.g. a Watch given up
    cancelled_here_ = true;
    client_context_.TryCancel();
  });
  copy_call_context(incoming_->context, &client_context_);
  upstream_ = control_plane->PrepareCall(&client_context_, incoming_->context.method(), queue);
  upstream_->StartCall(started_.start());
}

void StreamForward::on_started(bool ok) {
  if (!ok) {  // the control plane cannot be reached: its status says why
    finish_upstream();
    return;
  }
  upstream_->Read(&from_control_plane_, control_plane_message_.start());
  incoming_->stream.Read(&from_caller_, caller_message_.start());
}

void StreamForward::on_caller_message(bool ok) {
  if (upstream_finishing_) return;
  if (ok) {
    upstream_->Write(from_caller_, sent_up_.start());
  } else {
    upstream_->WritesDone(writes_done_.start());  // the caller half-closed (or left)
  }
}

void StreamForward::on_sent_up(bool ok) {
  if (ok && !upstream_finishing_) incoming_->stream.Read(&from_caller_, caller_message_.start());
}

void StreamForward::on_writes_done(bool) {}

void StreamForward::on_control_plane_message(bool ok) {
  if (ok) {
    incoming_->stream.Write(from_control_plane_, sent_down_.start());
  } else {
    finish_upstream();  // no more messages: the status is next
  }
}

void StreamForward::on_sent_down(bool ok) {
  if (ok) {
    upstream_->Read(&from_control_plane_, control_plane_message_.start());
  } else {  // the caller is gone
    cancelled_here_ = true;
    client_context_.TryCancel();
    finish_upstream();
  }
}

void StreamForward::finish_upstream() {
  if (upstream_finishing_) return;
  upstream_finishing_ = true;
  upstream_->Finish(&status_, control_plane_status_.start());
}

void StreamForward::on_control_plane_status(bool) {
  copy_trailers(client_context_, &incoming_->context);
  incoming_->stream.Finish(cancelled_here_ ? status_ : caller_status(status_), finished_.start());
}

void StreamForward::on_finished(bool) { finished(); }

StreamForward::~StreamForward() { --*open_relays_; }

}  // namespace maas::dataplane
