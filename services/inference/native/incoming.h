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

class Incoming : public Operations {
 public:
  // Asks for the next call; `dispatch` gets it once it arrives (and another Incoming waits).
  static void await_next(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
                         const Dispatch* dispatch) {
    new Incoming(service, queue, dispatch);
  }

  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};

 private:
  Incoming(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
           const Dispatch* dispatch)
      : service_(service), queue_(queue), dispatch_(dispatch) {
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
  Step<Incoming> accepted_{this, &Incoming::on_accepted};
};

}  // namespace maas::dataplane
