// maas-inference-dataplane: the inference service's native front door.
//
// It listens on the service's public port. ModelInfer (KServe-v2) and Predict requests it can
// prove valid go straight to Triton; every other call, and every request it declines, is
// relayed to the control plane (the Python service on a loopback port), which stays the one
// implementation of every rule. The control plane starts this process and owns it:
//
//   stdin   one JSON object per line: {"generation": N, "triton_ready": bool, "routes": {...}}
//           replaces the routing table ("applied N" is written once it is in force);
//           {"stats": true} asks for the counters ("stats {...}"); {"spans": true} takes the
//           span records of served requests that carried a traceparent, or were sampled
//           for the access log ("spans {...}").
//   --latency-buckets-ms=0.5,1,...  bounds of the per-deployment latency histogram (stats)
//   --access-sample-every=N         one in N served requests is recorded for the access log
//           End of input stops serving.
//   stdout  "listening PORT" once the port is bound, then the answers above.
//
// The process dies with its parent (PR_SET_PDEATHSIG), so it never outlives the service.
#include <signal.h>
#include <sys/prctl.h>

#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "event_loop.h"
#include "forward.h"
#include "incoming.h"
#include "infer.h"

namespace maas::dataplane {
namespace {

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr char kPredict[] = "/maas.inference.v1.InferenceService/Predict";

struct Options {
  std::string listen, control_plane, triton, tokens_file, tls_cert, tls_key, tls_client_ca;
  int max_message_bytes = 64 << 20;
  // How long the loop stays awake after an event while Triton calls are open (0: never).
  int spin_microseconds = 1000;
  double shutdown_grace_seconds = 10;
  std::vector<double> latency_buckets_ms;
  uint64_t access_sample_every = 0;
};

Options parse_options(int argc, char** argv) {
  std::map<std::string, std::string> given;
  for (int i = 1; i < argc; ++i) {
    std::string argument(argv[i]);
    size_t equals = argument.find('=');
    if (argument.rfind("--", 0) != 0 || equals == std::string::npos)
      throw std::invalid_argument("arguments look like --name=value, got " + argument);
    given[argument.substr(2, equals - 2)] = argument.substr(equals + 1);
  }
  auto take = [&](const char* name, bool required) {
    auto found = given.find(name);
    if (found == given.end()) {
      if (required) throw std::invalid_argument(std::string("--") + name + " is required");
      return std::string();
    }
    std::string value = found->second;
    given.erase(found);
    return value;
  };
  Options options;
  options.listen = take("listen", true);
  options.control_plane = take("control-plane", true);
  options.triton = take("triton", true);
  options.tokens_file = take("tokens-file", false);
  options.tls_cert = take("tls-cert", false);
  options.tls_key = take("tls-key", false);
  options.tls_client_ca = take("tls-client-ca", false);
  if (auto bytes = take("max-message-bytes", false); !bytes.empty())
    options.max_message_bytes = std::stoi(bytes);
  if (auto spin = take("spin-microseconds", false); !spin.empty())
    options.spin_microseconds = std::stoi(spin);
  if (auto grace = take("shutdown-grace-seconds", false); !grace.empty())
    options.shutdown_grace_seconds = std::stod(grace);
  if (auto buckets = take("latency-buckets-ms", false); !buckets.empty()) {
    std::stringstream list(buckets);
    for (std::string bound; std::getline(list, bound, ',');)
      options.latency_buckets_ms.push_back(std::stod(bound));
  }
  if (auto every = take("access-sample-every", false); !every.empty())
    options.access_sample_every = std::stoull(every);
  if (!given.empty()) throw std::invalid_argument("unknown option --" + given.begin()->first);
  return options;
}

std::string read_file(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::invalid_argument("cannot read " + path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

std::shared_ptr<grpc::ServerCredentials> server_credentials(const Options& options) {
  if (options.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                    : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_key_cert_pairs.push_back({read_file(options.tls_key), read_file(options.tls_cert)});
  if (!options.tls_client_ca.empty()) ssl.pem_root_certs = read_file(options.tls_client_ca);
  return grpc::SslServerCredentials(ssl);
}

std::shared_ptr<grpc::Channel> local_channel(const std::string& target, int max_message_bytes) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(max_message_bytes);
  arguments.SetMaxSendMessageSize(max_message_bytes);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
}

// Hands each accepted call to what serves its method.
Dispatch dispatch_by_method(DataPlane* plane) {
  return [plane](std::unique_ptr<Incoming> incoming) {
    const std::string& method = incoming->context.method();
    if (method == kModelInfer) {
      new InferCall(std::move(incoming), plane, InferCall::Protocol::kKServe);
    } else if (method == kPredict) {
      new InferCall(std::move(incoming), plane, InferCall::Protocol::kPredict);
    } else {
      new StreamForward(std::move(incoming), plane->control_plane(), plane->queue(),
                        plane->counters().open_relays());
    }
  };
}

void answer(const std::string& line) { std::cout << line << std::endl; }

void serve_control_lines(DataPlane* plane) {
  std::string line;
  while (std::getline(std::cin, line)) {
    try {
      auto document = nlohmann::json::parse(line);
      if (document.contains("stats")) {
        answer("stats " + plane->counters().to_json());
        continue;
      }
      if (document.contains("spans")) {
        answer("spans " + plane->spans().drain_json());
        continue;
      }
      auto table = RouteTable::parse(line);
      uint64_t generation = table->generation;
      plane->set_table(std::move(table));
      answer("applied " + std::to_string(generation));
    } catch (const std::exception& error) {
      answer(std::string("refused ") + nlohmann::json(error.what()).dump());
    }
  }
}

int run(const Options& options) {
  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, server_credentials(options), &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterAsyncGenericService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> queue = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "maas-inference-dataplane: cannot listen on " << options.listen << std::endl;
    return 1;
  }
  auto tokens = options.tokens_file.empty() ? nullptr
                                            : std::make_unique<TokenTable>(options.tokens_file);
  DataPlane plane(local_channel(options.triton, options.max_message_bytes),
                  local_channel(options.control_plane, options.max_message_bytes),
                  std::move(tokens), queue.get());
  plane.counters().set_latency_bounds(options.latency_buckets_ms);
  plane.spans().set_sample_every(options.access_sample_every);
  const Dispatch dispatch = dispatch_by_method(&plane);
  Incoming::await_next(&service, queue.get(), &dispatch);
  const std::function<bool()> awaiting_answers = [&plane] { return plane.triton_calls_open() > 0; };
  const auto spin = std::chrono::microseconds(options.spin_microseconds);
  std::thread loop([&] { run_loop(queue.get(), awaiting_answers, spin); });

  answer("listening " + std::to_string(port));
  serve_control_lines(&plane);  // until the control plane closes our stdin
  auto grace = std::chrono::milliseconds(static_cast<int64_t>(options.shutdown_grace_seconds * 1000));
  server->Shutdown(std::chrono::system_clock::now() + grace);
  queue->Shutdown();
  loop.join();
  return 0;
}

}  // namespace
}  // namespace maas::dataplane

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) return 1;  // the parent is already gone
  try {
    return maas::dataplane::run(maas::dataplane::parse_options(argc, argv));
  } catch (const std::exception& error) {
    std::cerr << "maas-inference-dataplane: " << error.what() << std::endl;
    return 2;
  }
}
