#include "model/speculation_policy.hpp"

#include <cstdio>
#include <algorithm>
#include <numeric>

#include "protocol/errors.hpp"

namespace troupe {

speculation_policy::speculation_policy(speculation_config config) : config_(config), backoff_(config.retry_after) {
  if (config_.draft_tokens < 1) throw input_error("draft tokens per round must be at least 1, got " + std::to_string(config_.draft_tokens));
  if (config_.window < 1) throw input_error("the speculation window must be at least 1 round");
}

double speculation_policy::window_mean() const {
  if (recent_.empty()) return 0;
  return static_cast<double>(std::accumulate(recent_.begin(), recent_.end(), std::int64_t{0})) / static_cast<double>(recent_.size());
}

speculation_switch speculation_policy::record_round(std::int64_t accepted) {
  recent_.push_back(accepted);
  if (static_cast<std::int64_t>(recent_.size()) > config_.window) recent_.pop_front();
  if (config_.retry_after > 0 && static_cast<std::int64_t>(recent_.size()) == config_.window &&
      window_mean() < config_.min_acceptance_length) {
    if (retried_) backoff_ = std::min(backoff_ * 2, 16 * config_.retry_after);  // the retry did not pay either
    off_ = true;
    plain_steps_ = 0;
    return speculation_switch::turned_off;
  }
  return speculation_switch::none;
}

speculation_switch speculation_policy::record_plain_step() {
  if (!off_ || ++plain_steps_ < backoff_) return speculation_switch::none;
  off_ = false;
  retried_ = true;
  recent_.clear();  // a fresh window: the text may have moved somewhere the draft knows
  return speculation_switch::turned_on;
}

std::string speculation_policy::describe(speculation_switch s) const {
  char buf[160];
  if (s == speculation_switch::turned_off)
    std::snprintf(buf, sizeof buf, "speculation off: %.2f drafts accepted per round over %lld rounds (< %.2f); retry in %lld steps",
                  window_mean(), static_cast<long long>(config_.window), config_.min_acceptance_length,
                  static_cast<long long>(backoff_));
  else if (s == speculation_switch::turned_on)
    std::snprintf(buf, sizeof buf, "speculation on again after %lld plain steps", static_cast<long long>(backoff_));
  else
    buf[0] = 0;
  return buf;
}

}  // namespace troupe
