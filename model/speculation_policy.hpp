// When to speculate: drafting pays only while the draft's tokens are accepted often enough.
// The policy watches the acceptance of the last rounds of one sequence, turns speculation off
// when it falls below a threshold, and tries again after a number of plain steps.
// Invariant: the policy only chooses how many tokens to draft; the output never depends on it.
#pragma once

#include <cstdint>
#include <deque>
#include <string>

namespace troupe {

struct speculation_config {
  std::int64_t draft_tokens = 3;          // k per round while on
  double min_acceptance_length = 1.0;     // off when fewer drafts are accepted per round than this...
  std::int64_t window = 8;                // ...on average over this many rounds
  std::int64_t retry_after = 32;          // plain steps before speculating again (doubling each time the
                                          // retry fails too, up to 16x); 0: never turn off
  std::int64_t max_batch = 4;             // no drafting in steps of more sequences than this (0: no cutoff):
                                          // verifying k + 1 rows of every sequence stops paying once a step is
                                          // compute-bound (bench/README.md: batch 8 on the CPU with the demo pair)
};

enum class speculation_switch : std::uint8_t { none, turned_off, turned_on };

class speculation_policy {
 public:
  explicit speculation_policy(speculation_config config);

  /// Tokens to draft in the next round; 0 while speculation is off.
  std::int64_t next_draft_tokens() const { return off_ ? 0 : config_.draft_tokens; }
  /// After a speculative round: may turn speculation off.
  speculation_switch record_round(std::int64_t accepted);
  /// After a plain (non-speculative) step: may turn speculation back on.
  speculation_switch record_plain_step();
  /// Mean accepted drafts per round over the current window (for logs).
  double window_mean() const;
  /// A line saying what the last switch was and why.
  std::string describe(speculation_switch s) const;

 private:
  speculation_config config_;
  std::deque<std::int64_t> recent_;  // accepted drafts of the last rounds
  bool off_ = false;
  std::int64_t plain_steps_ = 0;
  std::int64_t backoff_ = 0;  // plain steps before the next retry
  bool retried_ = false;      // speculation was turned back on at least once
};

}  // namespace troupe
