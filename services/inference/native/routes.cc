// Parsing of the pushed routing table and of the tokens file.
#include "routes.h"

#include <fnmatch.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <zlib.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace maas::dataplane {
namespace {

const std::unordered_map<std::string, size_t> kItemBytes = {
    {"BOOL", 1}, {"UINT8", 1}, {"INT8", 1},   {"UINT16", 2}, {"INT16", 2}, {"FP16", 2},
    {"BF16", 2}, {"UINT32", 4}, {"INT32", 4}, {"FP32", 4},   {"UINT64", 8}, {"INT64", 8},
    {"FP64", 8}};

std::vector<TensorSpec> tensor_specs(const nlohmann::json& list) {
  std::vector<TensorSpec> specs;
  for (const auto& item : list) {
    TensorSpec spec{item.at("name").get<std::string>(), item.at("datatype").get<std::string>(),
                    item.at("shape").get<std::vector<int64_t>>()};
    auto size = kItemBytes.find(spec.datatype);
    if (size == kItemBytes.end()) throw std::invalid_argument("no fixed size: " + spec.datatype);
    spec.item_bytes = size->second;
    specs.push_back(std::move(spec));
  }
  return specs;
}

std::string sha256_hex(const std::string& text) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest);
  static const char* kHex = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * SHA256_DIGEST_LENGTH);
  for (unsigned char byte : digest) {
    hex.push_back(kHex[byte >> 4]);
    hex.push_back(kHex[byte & 15]);
  }
  return hex;
}

std::string trim(const std::string& text) {
  const char* space = " \t\r\n";
  size_t begin = text.find_first_not_of(space);
  if (begin == std::string::npos) return "";
  return text.substr(begin, text.find_last_not_of(space) - begin + 1);
}

}  // namespace

const TensorSpec* Target::input(const std::string& name) const {
  for (const auto& spec : inputs)
    if (spec.name == name) return &spec;
  return nullptr;
}

const TensorSpec* Target::output(const std::string& name) const {
  for (const auto& spec : outputs)
    if (spec.name == name) return &spec;
  return nullptr;
}

const Target& Route::pick(const std::string& request_id) const {
  if (targets.size() == 1) return targets.front();
  uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(request_id.data()), request_id.size());
  return targets[buckets[crc % buckets.size()]];
}

std::shared_ptr<const RouteTable> RouteTable::parse(const std::string& json_line) {
  auto document = nlohmann::json::parse(json_line);
  auto table = std::make_shared<RouteTable>();
  table->generation = document.at("generation").get<uint64_t>();
  table->triton_ready = document.at("triton_ready").get<bool>();
  table->relay_all = document.value("relay_all", false);
  for (const auto& tenant : document.value("relay_tenants", nlohmann::json::array()))
    table->relay_tenants.insert(tenant.get<std::string>());
  for (const auto& [deployment_id, body] : document.at("routes").items()) {
    auto route = std::make_shared<Route>();
    size_t bucket = 0;
    for (const auto& item : body.at("targets")) {
      Target target;
      target.triton_model = item.at("triton_model").get<std::string>();
      target.version = item.at("version").get<std::string>();
      target.model_id = item.at("model_id").get<std::string>();
      target.percent = item.at("percent").get<int>();
      target.max_batch_size = item.at("max_batch_size").get<int>();
      target.max_calls_in_flight = std::max(1, item.at("max_calls_in_flight").get<int>());
      target.inputs = tensor_specs(item.at("inputs"));
      target.outputs = tensor_specs(item.at("outputs"));
      if (target.max_batch_size < 1) throw std::invalid_argument("unbatched target");
      for (int i = 0; i < target.percent && bucket < route->buckets.size(); ++i)
        route->buckets[bucket++] = static_cast<int>(route->targets.size());
      route->targets.push_back(std::move(target));
    }
    if (route->targets.empty() || bucket != route->buckets.size())
      throw std::invalid_argument("percents of " + deployment_id + " must add up to 100");
    table->routes.emplace(deployment_id, std::move(route));
  }
  return table;
}

std::shared_ptr<const std::vector<std::string>> TokenTable::scopes_for(
    const std::string& header_value, std::string* principal, std::string* tenant) {
  // Trimmed as the control plane trims it: perf_analyzer's `-H` keeps the space after ':'.
  std::string authorization = trim(header_value);
  size_t space = authorization.find(' ');
  if (space == std::string::npos) return nullptr;
  std::string scheme = authorization.substr(0, space);
  for (auto& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string token = trim(authorization.substr(space + 1));
  if (scheme != "bearer" || token.empty()) return nullptr;
  std::string digest = sha256_hex(token);
  std::lock_guard<std::mutex> lock(mutex_);
  reload_if_changed();
  auto found = by_hash_.find(digest);
  if (found == by_hash_.end()) return nullptr;
  if (principal != nullptr) *principal = principal_by_hash_[digest];
  if (tenant != nullptr) *tenant = tenant_by_hash_[digest];
  return found->second;
}

bool TokenTable::covers(const std::vector<std::string>& scopes, const std::string& model_id) {
  if (scopes.empty()) return true;
  for (const auto& pattern : scopes)
    if (fnmatch(pattern.c_str(), model_id.c_str(), FNM_NOESCAPE) == 0) return true;
  return false;
}

void TokenTable::reload_if_changed() {
  auto now = std::chrono::steady_clock::now();
  if (now - checked_at_ < std::chrono::seconds(1)) return;
  checked_at_ = now;
  struct stat info {};
  if (stat(path_.c_str(), &info) != 0) {
    by_hash_.clear();
    loaded_mtime_ns_ = -1;
    return;
  }
  int64_t mtime_ns = int64_t(info.st_mtim.tv_sec) * 1000000000 + info.st_mtim.tv_nsec;
  if (mtime_ns == loaded_mtime_ns_) return;
  std::unordered_map<std::string, std::shared_ptr<const std::vector<std::string>>> by_hash;
  std::unordered_map<std::string, std::string> principal_by_hash;
  std::unordered_map<std::string, std::string> tenant_by_hash;
  try {
    std::ifstream file(path_);
    auto document = nlohmann::json::parse(file);
    for (const auto& entry : document.value("tokens", nlohmann::json::array())) {
      auto scopes = std::make_shared<std::vector<std::string>>(
          entry.value("models", std::vector<std::string>{}));
      const auto digest = entry.at("sha256").get<std::string>();
      by_hash[digest] = std::move(scopes);
      principal_by_hash[digest] = entry.value("principal", std::string());
      tenant_by_hash[digest] = entry.value("tenant", std::string());
      if (tenant_by_hash[digest].empty()) tenant_by_hash[digest] = principal_by_hash[digest];
    }
  } catch (const std::exception&) {
    return;  // half-written or broken: keep the last good table; the control plane reports it
  }
  by_hash_ = std::move(by_hash);
  principal_by_hash_ = std::move(principal_by_hash);
  tenant_by_hash_ = std::move(tenant_by_hash);
  loaded_mtime_ns_ = mtime_ns;
}

}  // namespace maas::dataplane
