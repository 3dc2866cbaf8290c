#include "actors/draft_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <unordered_map>

#include "model/speculative.hpp"
#include "protocol/error_text.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe {
namespace {

namespace fs = std::filesystem;

/// A loaded draft checkpoint, handed from the loader to the draft actor (in process only).
struct loaded_draft {
  std::shared_ptr<model> net;
  std::string dir, name;
};

}  // namespace
}  // namespace troupe

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::loaded_draft)

namespace troupe {
namespace {

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Loads a draft and checks it against the target; throws input_error saying why it cannot draft.
loaded_draft load_draft(const model& target, const std::string& target_dir, const std::string& dir) {
  if (!fs::is_directory(dir)) throw input_error("draft '" + dir + "' is not a model directory");
  const fs::path mine = fs::path(target_dir) / "tokenizer.json", theirs = fs::path(dir) / "tokenizer.json";
  if (fs::exists(mine) && fs::exists(theirs) && read_file(mine) != read_file(theirs))
    throw input_error("draft '" + dir + "' has another tokenizer (its tokenizer.json differs from the target's)");
  loaded_draft d;
  d.net = model::load(dir, target.compute());
  if (auto why = draft_mismatch(target, *d.net); !why.empty()) throw input_error("draft '" + dir + "' refused: " + why);
  d.dir = dir;
  d.name = fs::path(dir).lexically_normal().filename().string();
  if (d.name.empty()) d.name = fs::path(dir).lexically_normal().parent_path().filename().string();
  return d;
}

// One live sequence as the draft sees it.
struct draft_sequence {
  explicit draft_sequence(const sampling_params& p) : shape(p), gen(p.seed ^ 0x9e3779b97f4a7c15ull), greedy(p.temperature == 0) {}
  std::vector<std::int32_t> history;  // its tokens by position: prompt, accepted tokens, then the last round's drafts
  sequence_state cache;               // the draft's caches hold history[0, cache.num_tokens)
  sampler shape;                      // the request's sampling rule, for q
  rng gen;                            // the draft's own randomness (the head verifies with another)
  bool greedy;
  bool lost = false;                  // its history was lost (a restart): it no longer drafts
};

struct draft_state {
  draft_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute target;
  draft_options options;
  loaded_draft current;
  std::string previous_dir;  // what `rollback` reloads
  bool loading = false;
  embedding_actor next;
  std::unordered_map<seq_id, draft_sequence> seqs;
  static inline const char* name = "troupe.draft";
};

using draft_pointer = draft_actor::stateful_pointer<draft_state>;

// Brings each sequence's history up to the plan and picks how many tokens it drafts.
std::vector<std::int64_t> track(draft_state& st, const step_plan& plan) {
  const std::int64_t max_position = st.current.net->config().max_position_embeddings;
  std::vector<std::int64_t> k(plan.sequences.size(), 0);
  std::size_t offset = 0;
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const auto p = plan.first_position[i], n = plan.num_tokens[i];
    const auto* tokens = plan.tokens.data() + offset;
    offset += static_cast<std::size_t>(n);
    auto it = st.seqs.find(plan.sequences[i]);
    if (p == 0 || it == st.seqs.end()) {
      it = st.seqs.insert_or_assign(plan.sequences[i], draft_sequence(plan.sampling[i])).first;
      it->second.lost = p > 0;  // joined mid-sequence (this actor restarted): its history is unknown
    }
    auto& s = it->second;
    if (static_cast<std::int64_t>(s.history.size()) < p) s.lost = true;  // a gap: steps it never saw
    if (s.lost) continue;
    s.history.resize(static_cast<std::size_t>(p));
    s.history.insert(s.history.end(), tokens, tokens + n);
    if (plan.draft_tokens.empty()) continue;
    k[i] = std::clamp<std::int64_t>(plan.draft_tokens[i], 0, st.options.max_draft_tokens);
    if (max_position > 0) k[i] = std::min(k[i], std::max<std::int64_t>(0, max_position - (p + n)));
  }
  return k;
}

// Drafts k[i] tokens for every sequence (batched draft forwards); appends them to the
// histories and returns them per sequence, with the q rows of sampled sequences.
std::vector<std::vector<std::int32_t>> draft_tokens(draft_state& st, const step_plan& plan, const std::vector<std::int64_t>& k,
                                                    std::vector<std::vector<float>>& q) {
  model& draft = *st.current.net;
  std::vector<std::vector<std::int32_t>> drafts(k.size());
  std::vector<std::vector<std::int32_t>> feed(k.size());
  std::int64_t max_k = 0;
  for (std::size_t i = 0; i < k.size(); ++i) {
    if (k[i] == 0) continue;
    auto& s = st.seqs.at(plan.sequences[i]);
    // Rejected drafts of the last round leave the cache: keep what still matches the history.
    const auto valid = std::min<std::int64_t>(s.cache.num_tokens, plan.first_position[i]);
    if (valid < s.cache.num_tokens)
      roll_back(s.cache, valid, draft.ngram_after(std::span(s.history).first(static_cast<std::size_t>(valid))));
    feed[i].assign(s.history.begin() + valid, s.history.end());
    max_k = std::max(max_k, k[i]);
  }
  std::vector<std::vector<std::vector<float>>> q_of(k.size());
  for (std::int64_t round = 0; round < max_k; ++round) {
    std::vector<std::size_t> who;
    std::vector<step_input> in;
    for (std::size_t i = 0; i < k.size(); ++i)
      if (k[i] > round) {
        who.push_back(i);
        in.push_back({&st.seqs.at(plan.sequences[i]).cache, feed[i]});
      }
    const tensor logits = draft.forward(in, logits_mode::last_token);
    const auto vocab = static_cast<std::size_t>(logits.dim(1));
    for (std::size_t j = 0; j < who.size(); ++j) {
      const std::size_t i = who[j];
      auto& s = st.seqs.at(plan.sequences[i]);
      const std::span<const float> row(logits.data<float>() + j * vocab, vocab);
      std::int32_t d;
      if (s.greedy) {
        d = s.shape.greedy(row, s.history);
      } else {
        q_of[i].push_back(s.shape.distribution(row, s.history));
        d = draw(q_of[i].back(), s.gen.uniform());
      }
      s.history.push_back(d);
      drafts[i].push_back(d);
      feed[i].assign(1, d);
    }
  }
  for (auto& rows : q_of)
    for (auto& r : rows) q.push_back(std::move(r));
  return drafts;
}

// The plan with each sequence's drafts after its tokens.
void append_drafts(step_plan& plan, const std::vector<std::vector<std::int32_t>>& drafts,
                   const std::vector<std::vector<float>>& q, const std::string& name) {
  std::vector<std::int32_t> tokens;
  std::size_t offset = 0;
  plan.draft_tokens.assign(plan.sequences.size(), 0);
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const auto n = static_cast<std::size_t>(plan.num_tokens[i]);
    tokens.insert(tokens.end(), plan.tokens.begin() + static_cast<std::ptrdiff_t>(offset),
                  plan.tokens.begin() + static_cast<std::ptrdiff_t>(offset + n));
    offset += n;
    tokens.insert(tokens.end(), drafts[i].begin(), drafts[i].end());
    plan.num_tokens[i] += static_cast<std::int64_t>(drafts[i].size());
    plan.draft_tokens[i] = static_cast<std::int64_t>(drafts[i].size());
  }
  plan.tokens = std::move(tokens);
  if (!q.empty()) {
    const auto vocab = static_cast<std::int64_t>(q.front().size());
    plan.draft_probs = tensor::empty({static_cast<std::int64_t>(q.size()), vocab}, dtype::f32);
    for (std::size_t r = 0; r < q.size(); ++r) std::copy(q[r].begin(), q[r].end(), plan.draft_probs.data<float>() + r * vocab);
  }
  plan.draft_model = name;
}

// A new draft takes over: every sequence's draft cache starts empty and catches up on its
// history when it next drafts; the old model goes with its last reference.
void install(draft_state& st, loaded_draft d) {
  for (auto& [id, s] : st.seqs) s.cache = sequence_state{};
  std::cerr << "[draft] now drafting with '" << d.name << "' (" << d.dir << "), was '" << st.current.name << "'" << std::endl;
  st.previous_dir = st.current.dir;
  st.current = std::move(d);
}

std::string describe(const draft_state& st) {
  json_writer w;
  w.begin_object().key("draft").value(st.current.name).key("dir").value(st.current.dir);
  w.key("vocab_size").value(st.current.net->config().vocab_size);
  w.key("previous_dir").value(st.previous_dir).key("loading").value(st.loading);
  w.key("sequences").value(static_cast<std::int64_t>(st.seqs.size()));
  w.end_object();
  return w.str();
}

// Loads a draft off the actor's thread (loading takes a while; steps keep flowing meanwhile).
caf::behavior loader_impl(caf::event_based_actor* self, shared_compute target, std::string target_dir) {
  return {
      [=](load_draft_atom, const std::string& dir) -> caf::result<loaded_draft> {
        self->quit();
        try {
          return load_draft(*target->net, target_dir, dir);
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, e.what());
        }
      },
  };
}

caf::result<std::string> swap_to(draft_pointer self, const std::string& dir) {
  auto& st = self->state;
  if (st.loading) return caf::make_error(caf::sec::runtime_error, "a draft is already loading; try again when it is in");
  st.loading = true;
  auto rp = self->make_response_promise<std::string>();
  auto loader = self->system().spawn<caf::detached>(loader_impl, st.target, st.target->model_dir);
  std::cerr << "[draft] loading '" << dir << "' while serving on '" << st.current.name << "'" << std::endl;
  self->request(loader, caf::infinite, load_draft_atom::value, dir)
      .then(
          [=](loaded_draft& d) mutable {
            self->state.loading = false;
            install(self->state, std::move(d));
            rp.deliver("now drafting with '" + self->state.current.name + "' (" + self->state.current.dir + ")");
          },
          [=](caf::error& err) mutable {
            self->state.loading = false;
            const std::string why = error_text(self->system(), err);
            std::cerr << "[draft] kept '" << self->state.current.name << "': " << why << std::endl;
            rp.deliver(caf::make_error(caf::sec::runtime_error, why + "; still drafting with '" + self->state.current.name + "'"));
          });
  return rp;
}

draft_actor::behavior_type draft_impl(draft_pointer self, shared_compute target, draft_options options, loaded_draft first,
                                      embedding_actor next) {
  auto& st = self->state;
  st.target = std::move(target);
  st.options = std::move(options);
  st.current = std::move(first);
  st.next = std::move(next);
  return {
      [=](forward_atom, step_plan& plan) -> caf::result<step_result> {
        auto& st = self->state;
        try {
          const auto k = track(st, plan);
          if (std::any_of(k.begin(), k.end(), [](std::int64_t x) { return x > 0; })) {
            std::vector<std::vector<float>> q;
            const auto drafts = draft_tokens(st, plan, k, q);
            append_drafts(plan, drafts, q, st.current.name);
          } else {
            plan.draft_tokens.clear();
          }
        } catch (const std::exception& e) {
          // Drafting only proposes: the step goes on without drafts, the caches start over.
          std::cerr << "[draft] drafting failed, step " << plan.step << " runs without drafts: " << e.what() << std::endl;
          for (std::size_t i = 0; i < plan.sequences.size(); ++i)
            if (auto it = st.seqs.find(plan.sequences[i]); it != st.seqs.end()) {
              it->second.history.resize(static_cast<std::size_t>(plan.first_position[i] + plan.num_tokens[i]));
              it->second.cache = sequence_state{};
            }
          plan.draft_tokens.clear();
        }
        return self->delegate(st.next, forward_atom::value, std::move(plan));
      },
      [=](free_atom, std::vector<seq_id>& ids) {
        for (auto id : ids) self->state.seqs.erase(id);
        self->send(self->state.next, free_atom::value, std::move(ids));
      },
      [=](new_next_atom, caf::actor& next) { self->state.next = caf::actor_cast<embedding_actor>(next); },
      [=](load_draft_atom, std::string& dir) -> caf::result<std::string> { return swap_to(self, dir); },
      [=](rollback_atom) -> caf::result<std::string> {
        if (self->state.previous_dir.empty())
          return caf::make_error(caf::sec::runtime_error, "no previous draft to roll back to (drafting with '" +
                                                              self->state.current.name + "' since the start)");
        return swap_to(self, self->state.previous_dir);
      },
      [=](draft_info_atom) -> std::string { return describe(self->state); },
  };
}

}  // namespace

draft_actor spawn_draft(caf::actor_system& sys, shared_compute target, draft_options options, embedding_actor next) {
  loaded_draft first = load_draft(*target->net, target->model_dir, options.draft_dir);
  return sys.spawn(draft_impl, std::move(target), std::move(options), std::move(first), std::move(next));
}

}  // namespace troupe
