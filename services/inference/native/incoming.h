// A call accepted on the public port, before anything is known of it but its method.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <functional>
#include <memory>

#include "event_loop.h"

namespace maas::dataplane {

class Incoming;
// Takes an accepted call over (owning it from then on) and starts serving it.
using Dispatch = std::function<void(std::unique_ptr<Incoming>)>;

// The "call is done" notification of one call (AsyncNotifyWhenDone). It can arrive before or
// after whoever serves the call has let go of it, so it owns itself: it tells the holder of
// the call that the caller cancelled while the holder is there, and deletes itself once both
// the notification has come and the call has been released.
class CallDone : public Tag {
 public:
  explicit CallDone(grpc::ServerContextBase* context) : context_(context) {}

  std::function<void()> on_cancelled;

  void complete(bool) override {
    arrived_ = true;
    if (context_ != nullptr && context_->IsCancelled() && on_cancelled) on_cancelled();
    if (context_ == nullptr) delete this;
  }

  void release() {  // the call's context is about to go
    context_ = nullptr;
    on_cancelled = nullptr;
    if (arrived_) delete this;
  }

 private:
  grpc::ServerContextBase* context_;
  bool arrived_ = false;
};

class Incoming : public Operations {
 public:
  // Asks for the next call; `dispatch` gets it once it arrives (and another Incoming waits).
  static void await_next(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
                         const Dispatch* dispatch) {
    new Incoming(service, queue, dispatch);
  }

  ~Incoming() override { done_->release(); }

  // Called (on the loop thread) if the caller cancels while the call is being served.
  void on_cancelled(std::function<void()> callback) { done_->on_cancelled = std::move(callback); }

  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};

 private:
  Incoming(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
           const Dispatch* dispatch)
      : service_(service), queue_(queue), dispatch_(dispatch), done_(new CallDone(&context)) {
    context.AsyncNotifyWhenDone(done_);
    service_->RequestCall(&context, &stream, queue_, queue_, accepted_.start());
  }

  void on_accepted(bool ok) {
    if (!ok) {  // the server is shutting down
      finished();
      return;
    }
    await_next(service_, queue_, dispatch_);
    (*dispatch_)(std::unique_ptr<Incoming>(this));  // the handler owns it now
  }

  grpc::AsyncGenericService* service_;
  grpc::ServerCompletionQueue* queue_;
  const Dispatch* dispatch_;
  CallDone* done_;
  Step<Incoming> accepted_{this, &Incoming::on_accepted};
};

}  // namespace maas::dataplane
