// The routing table the Python control plane pushes, and the tokens file it shares.
//
// The data plane never decides anything the control plane has not told it: a deployment is in
// the table only while it is loaded, plainly routed (no shadow) and batch-splittable; a token
// only while the tokens file holds it. Whatever is not in the table goes to the control plane.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace maas::dataplane {

// One tensor of a signature. `shape` excludes the batch dimension; -1 is any size.
struct TensorSpec {
  std::string name;
  std::string datatype;  // KServe name: "FP32", "INT64", ...
  std::vector<int64_t> shape;
  size_t item_bytes = 0;
};

// One registry version loaded in Triton.
struct Target {
  std::string triton_model;  // e.g. "digits.digits.v3"
  std::string version;       // registry name, e.g. "models/digits/versions/3"
  std::string model_id;      // "digits": what token scopes are matched against
  int percent = 0;
  int max_batch_size = 0;
  int max_calls_in_flight = 1;  // model instances x calls per instance
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;

  std::string version_number() const { return version.substr(version.rfind('/') + 1); }
  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

// Where one deployment's requests go: weighted targets, sticky by request id.
struct Route {
  std::vector<Target> targets;
  std::array<int, 100> buckets{};  // bucket -> index into targets

  // Same choice as the control plane's `Route.pick`: crc32(request id) % 100.
  const Target& pick(const std::string& request_id) const;
};

struct RouteTable {
  uint64_t generation = 0;
  bool triton_ready = false;
  std::unordered_map<std::string, std::shared_ptr<const Route>> routes;
  // Tenants whose requests the control plane must admit (tenant limits it enforces);
  // `relay_all`: every request's. Such requests are declined here, whatever else holds.
  bool relay_all = false;
  std::unordered_set<std::string> relay_tenants;

  // Parses one JSON line from the control plane; throws std::exception when malformed.
  static std::shared_ptr<const RouteTable> parse(const std::string& json_line);
};

// Token hashes -> model scopes, read from the service's tokens file and re-read when it
// changes (looked at once a second at most, like the control plane's TokenStore).
class TokenTable {
 public:
  explicit TokenTable(std::string path) : path_(std::move(path)) {}

  // The scopes of the bearer token in `authorization` ("Bearer <token>"); nullptr when the
  // header is missing, malformed or names no known token (the control plane explains why).
  // `principal`, when given, receives the token's principal (for the access log); `tenant`
  // its tenant (the entry's "tenant", else its principal: whose limits and usage it is).
  std::shared_ptr<const std::vector<std::string>> scopes_for(const std::string& authorization,
                                                             std::string* principal = nullptr,
                                                             std::string* tenant = nullptr);

  // Whether scopes (empty: every model) cover `model_id`, as fnmatch.fnmatchcase would.
  static bool covers(const std::vector<std::string>& scopes, const std::string& model_id);

 private:
  void reload_if_changed();

  std::string path_;
  std::mutex mutex_;
  std::chrono::steady_clock::time_point checked_at_{};
  int64_t loaded_mtime_ns_ = -1;
  std::unordered_map<std::string, std::shared_ptr<const std::vector<std::string>>> by_hash_;
  std::unordered_map<std::string, std::string> principal_by_hash_;
  std::unordered_map<std::string, std::string> tenant_by_hash_;  // "tenant", else the principal
};

}  // namespace maas::dataplane
