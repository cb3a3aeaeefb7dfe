// One thread, one completion queue: every gRPC operation of the data plane completes here.
//
// Each asynchronous operation carries a `Step` as its tag; when the queue hands the tag back,
// the step calls its owner's member function with the operation's `ok`. All call state is
// touched by the loop thread only, so none of it needs a lock (a thread hop per operation
// costs more CPU than the work a data plane does per request).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>

namespace maas::dataplane {

class Tag {
 public:
  virtual ~Tag() = default;
  virtual void complete(bool ok) = 0;
};

// An operation's tag that calls `owner->*handler(ok)` and keeps the owner's count of
// operations in flight, so the owner knows when it may delete itself.
template <class Owner>
class Step : public Tag {
 public:
  Step(Owner* owner, void (Owner::*handler)(bool)) : owner_(owner), handler_(handler) {}

  // The tag to pass to the operation being started now.
  void* start() {
    ++owner_->operations_in_flight;
    return this;
  }

  void complete(bool ok) override {
    --owner_->operations_in_flight;
    (owner_->*handler_)(ok);
    owner_->delete_when_idle();
  }

 private:
  Owner* owner_;
  void (Owner::*handler_)(bool);
};

// Owners of steps derive from this: `finished()` marks the end, and the object deletes itself
// once no operation of it is in flight any more.
class Operations {
 public:
  virtual ~Operations() = default;
  int operations_in_flight = 0;

  void delete_when_idle() {
    if (finished_ && operations_in_flight == 0) delete this;
  }

 protected:
  void finished() { finished_ = true; }

 private:
  bool finished_ = false;
};

// Runs the loop until the queue is shut down and drained.
//
// While `awaiting_answers()` (calls to Triton are open) the queue is polled without sleeping,
// for at most `spin` after the last event: the answer is caught by a thread that is awake,
// which saves the wake-up of a sleeping one (tens of microseconds on a virtual machine, most
// of what the hop adds at low concurrency). With nothing open the thread sleeps at once, so
// an idle data plane costs no CPU.
inline void run_loop(grpc::CompletionQueue* queue, const std::function<bool()>& awaiting_answers,
                     std::chrono::microseconds spin) {
  void* tag = nullptr;
  bool ok = false;
  auto spin_until = std::chrono::steady_clock::now();
  while (true) {
    auto status = grpc::CompletionQueue::TIMEOUT;
    if (awaiting_answers() && std::chrono::steady_clock::now() < spin_until) {
      status = queue->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
      if (status == grpc::CompletionQueue::TIMEOUT) continue;
    } else {
      status = queue->Next(&tag, &ok) ? grpc::CompletionQueue::GOT_EVENT
                                      : grpc::CompletionQueue::SHUTDOWN;
    }
    if (status == grpc::CompletionQueue::SHUTDOWN) return;
    static_cast<Tag*>(tag)->complete(ok);
    spin_until = std::chrono::steady_clock::now() + spin;
  }
}

}  // namespace maas::dataplane
