#include "gateway/metrics.hpp"

#include <cstdio>

namespace troupe::gateway {
namespace {

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void line(std::string& out, const std::string& name, const std::string& help, const char* type) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

}  // namespace

void histogram::observe(double v) {
  std::size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void histogram::render(std::string& out, const std::string& name) const {
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    out += name + "_bucket{le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + num(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

gateway_metrics::gateway_metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}),
      acceptance_({0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8}) {}

void gateway_metrics::request_finished(const std::string& outcome) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[outcome];
}

void gateway_metrics::tokens(std::int64_t prompt, std::int64_t completion) {
  std::lock_guard<std::mutex> lock(mutex_);
  prompt_tokens_ += static_cast<std::uint64_t>(prompt);
  completion_tokens_ += static_cast<std::uint64_t>(completion);
}

void gateway_metrics::time_to_first_token(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  ttft_.observe(seconds);
}

void gateway_metrics::inter_token(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  itl_.observe(seconds);
}

void gateway_metrics::speculation(const request_done& done) {
  if (done.draft_rounds == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  acceptance_.observe(static_cast<double>(done.accepted_tokens) / static_cast<double>(done.draft_rounds));
}

void gateway_metrics::connection_opened() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++connections_;
}

void gateway_metrics::connection_closed() {
  std::lock_guard<std::mutex> lock(mutex_);
  --connections_;
}

namespace {

// A Prometheus label value: backslash, quote and newline escaped.
std::string label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

// Per draft model: rounds, drafted and accepted tokens, and what they mean.
void render_speculation(std::string& out, const scheduler_metrics& s) {
  line(out, "troupe_speculation_rounds_total", "Verification rounds of drafted tokens, per draft model.", "counter");
  for (const auto& d : s.drafts) out += "troupe_speculation_rounds_total{draft=\"" + label(d.draft) + "\"} " + std::to_string(d.rounds) + "\n";
  line(out, "troupe_speculation_drafted_tokens_total", "Tokens proposed by the draft, per draft model.", "counter");
  for (const auto& d : s.drafts) out += "troupe_speculation_drafted_tokens_total{draft=\"" + label(d.draft) + "\"} " + std::to_string(d.drafted) + "\n";
  line(out, "troupe_speculation_accepted_tokens_total", "Drafted tokens the target accepted, per draft model.", "counter");
  for (const auto& d : s.drafts) out += "troupe_speculation_accepted_tokens_total{draft=\"" + label(d.draft) + "\"} " + std::to_string(d.accepted) + "\n";
  line(out, "troupe_speculation_acceptance_length", "Mean drafts accepted per round, per draft model.", "gauge");
  for (const auto& d : s.drafts)
    out += "troupe_speculation_acceptance_length{draft=\"" + label(d.draft) + "\"} " + num(d.rounds ? double(d.accepted) / double(d.rounds) : 0) + "\n";
  line(out, "troupe_speculation_acceptance_rate", "Share of drafted tokens accepted, per draft model.", "gauge");
  for (const auto& d : s.drafts)
    out += "troupe_speculation_acceptance_rate{draft=\"" + label(d.draft) + "\"} " + num(d.drafted ? double(d.accepted) / double(d.drafted) : 0) + "\n";
  line(out, "troupe_speculation_switched_off_total", "Times a request's speculation was switched off for low acceptance.", "counter");
  out += "troupe_speculation_switched_off_total " + std::to_string(s.speculation_off_switches) + "\n";
}

}  // namespace

std::string gateway_metrics::render(const scheduler_metrics& s) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  line(out, "troupe_requests_total", "Requests by outcome.", "counter");
  for (const char* o : {"eos", "length", "stop", "cancelled", "error", "rejected"}) {
    auto it = requests_.find(o);
    out += std::string("troupe_requests_total{outcome=\"") + o + "\"} " +
           std::to_string(it == requests_.end() ? 0 : it->second) + "\n";
  }
  line(out, "troupe_prompt_tokens_total", "Prompt tokens of finished requests.", "counter");
  out += "troupe_prompt_tokens_total " + std::to_string(prompt_tokens_) + "\n";
  line(out, "troupe_generation_tokens_total", "Tokens generated for finished requests.", "counter");
  out += "troupe_generation_tokens_total " + std::to_string(completion_tokens_) + "\n";
  line(out, "troupe_time_to_first_token_seconds", "Time from request to its first token.", "histogram");
  ttft_.render(out, "troupe_time_to_first_token_seconds");
  line(out, "troupe_inter_token_latency_seconds", "Time between consecutive tokens of a request.", "histogram");
  itl_.render(out, "troupe_inter_token_latency_seconds");
  line(out, "troupe_connections", "Open client connections.", "gauge");
  out += "troupe_connections " + std::to_string(connections_) + "\n";
  line(out, "troupe_queue_depth", "Requests waiting for admission.", "gauge");
  out += "troupe_queue_depth " + std::to_string(s.waiting) + "\n";
  line(out, "troupe_running_sequences", "Sequences in the running batch.", "gauge");
  out += "troupe_running_sequences " + std::to_string(s.running) + "\n";
  line(out, "troupe_kv_blocks_used", "KV-cache blocks reserved by running requests.", "gauge");
  out += "troupe_kv_blocks_used " + std::to_string(s.kv_blocks_used) + "\n";
  line(out, "troupe_kv_blocks_total", "KV-cache budget in blocks.", "gauge");
  out += "troupe_kv_blocks_total " + std::to_string(s.kv_blocks_total) + "\n";
  line(out, "troupe_kv_usage_ratio", "Share of the KV-cache budget in use.", "gauge");
  out += "troupe_kv_usage_ratio " + num(s.kv_blocks_total ? double(s.kv_blocks_used) / double(s.kv_blocks_total) : 0) + "\n";
  line(out, "troupe_scheduler_steps_total", "Steps run by the scheduler.", "counter");
  out += "troupe_scheduler_steps_total " + std::to_string(s.steps) + "\n";
  render_speculation(out, s);
  line(out, "troupe_request_acceptance_length", "Drafts accepted per verification round, per finished request.", "histogram");
  acceptance_.render(out, "troupe_request_acceptance_length");
  return out;
}

}  // namespace troupe::gateway
