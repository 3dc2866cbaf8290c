#include "actors/draft_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <unordered_map>

#include "model/speculative.hpp"
#include "protocol/error_text.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe {
namespace {

namespace fs = std::filesystem;

/// A loaded draft checkpoint, handed from the loader to the draft actor (in process only), or
/// the target's own MTP head (`mtp`: no model of its own).
struct loaded_draft {
  std::shared_ptr<model> net;
  std::string dir, name;
  bool mtp = false;
};

/// What `draft load` takes to mean the target's MTP head.
constexpr const char* mtp_draft = "mtp";

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
  if (dir == mtp_draft) {
    if (!target.has_mtp())
      throw input_error("the target checkpoint has no MTP head (model.mtp.*; config num_nextn_predict_layers: 1)");
    return {nullptr, mtp_draft, mtp_draft, true};
  }
  if (!fs::is_directory(dir)) throw input_error("draft '" + dir + "' is not a model directory");
  const fs::path mine = fs::path(target_dir) / "tokenizer.json", theirs = fs::path(dir) / "tokenizer.json";
  if (fs::exists(mine) && fs::exists(theirs) && read_file(mine) != read_file(theirs))
    throw input_error("draft '" + dir + "' has another tokenizer (its tokenizer.json differs from the target's)");
  // On a GPU the draft gets a stream of its own, so its steps replay recordings (k greedy steps
  // in one) while the target's actors enqueue on theirs: its results come back to the host,
  // so nothing orders the two streams. Where the backend has no such thing (the CPU) the draft
  // shares it and runs op by op.
  struct owned_draft {
    std::unique_ptr<backend> be;  // declared first: the model goes before its backend
    std::unique_ptr<model> net;
  };
  auto owned = std::make_shared<owned_draft>();
  owned->be = target.compute().own_stream();
  // A draft is small by design: on a GPU its tables live there too, so its steps embed inside the replay.
  owned->net = owned->be ? model::load(dir, *owned->be, table_placement::device) : model::load(dir, target.compute());
  if (!owned->be) owned->net->set_recorded_steps(false);  // a capture on the shared stream would take others' ops in
  loaded_draft d;
  d.net = std::shared_ptr<model>(owned, owned->net.get());
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
  sequence_state mtp;                 // MTP drafting: its layer's cache holds the rows of tokens 1..mtp.num_tokens
  sampler shape;                      // the request's sampling rule, for q
  rng gen;                            // the draft's own randomness (the head verifies with another)
  bool greedy;
  bool lost = false;                  // its history was lost (a restart): it no longer drafts
  bool mtp_lost = false;              // the MTP head missed some of its target hidden states: no MTP drafts
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
  std::unique_ptr<latent_block_allocator> mtp_blocks;  // the MTP layer's KV blocks (MTP drafting)
  static inline const char* name = "troupe.draft";

  /// The model that drafts: the draft checkpoint, or the target (its MTP head).
  model& drafter() const { return current.mtp ? *target->net : *current.net; }
};

using draft_pointer = draft_actor::stateful_pointer<draft_state>;

// Brings each sequence's history up to the plan and picks how many tokens it drafts.
std::vector<std::int64_t> track(draft_state& st, const step_plan& plan) {
  const std::int64_t max_position = st.drafter().config().max_position_embeddings;
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

// Tokens picked from one row of draft logits per sequence in `who`, by each sequence's rule;
// appends them to the histories and drafts (and the q rows of sampled sequences).
void pick_drafts(draft_state& st, const step_plan& plan, const std::vector<std::size_t>& who, const tensor& logits,
                 std::vector<std::vector<std::int32_t>>& drafts, std::vector<std::vector<std::vector<float>>>& q_of) {
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
  }
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
  // Greedy without a penalty needs only each row's argmax: sequences drafting k tokens draft
  // them in one draft_greedy call (picked on the device; ids, not rows of logits, come back).
  bool argmax_only = true;
  for (std::size_t i = 0; i < k.size(); ++i) {
    const auto& s = st.seqs.at(plan.sequences[i]);
    argmax_only = argmax_only && (k[i] == 0 || (s.greedy && s.shape.params().repetition_penalty == 1.0f));
  }
  if (argmax_only) {
    std::map<std::int64_t, std::vector<std::size_t>> by_k;
    for (std::size_t i = 0; i < k.size(); ++i)
      if (k[i] > 0) by_k[k[i]].push_back(i);
    for (const auto& [n, who] : by_k) {
      std::vector<step_input> in;
      for (auto i : who) in.push_back({&st.seqs.at(plan.sequences[i]).cache, feed[i]});
      const auto picks = draft.draft_greedy(in, n);
      for (std::size_t j = 0; j < who.size(); ++j) {
        drafts[who[j]] = picks[j];
        auto& history = st.seqs.at(plan.sequences[who[j]]).history;
        history.insert(history.end(), picks[j].begin(), picks[j].end());
      }
    }
    return drafts;
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
    pick_drafts(st, plan, who, draft.forward(in, logits_mode::last_token), drafts, q_of);
    for (auto i : who) feed[i].assign(1, drafts[i].back());
  }
  for (auto& rows : q_of)
    for (auto& r : rows) q.push_back(std::move(r));
  return drafts;
}

// MTP drafting. First the MTP layer takes in the positions the last step settled (token j with
// the target's hidden state at j - 1, for every j the plan's hidden rows reach), replacing the
// rows it had drafted there; then it drafts k tokens from its own hidden states.
std::vector<std::vector<std::int32_t>> mtp_drafts(draft_state& st, const step_plan& plan, std::vector<std::int64_t>& k,
                                                  std::vector<std::vector<float>>& q) {
  model& net = *st.target->net;
  const auto& c = net.config();
  if (!st.mtp_blocks)
    st.mtp_blocks = std::make_unique<latent_block_allocator>(net.compute(), default_kv_block_tokens,
                                                             c.kv_lora_rank + c.qk_rope_head_dim);
  std::vector<std::vector<std::int32_t>> drafts(k.size());
  std::vector<std::vector<std::vector<float>>> q_of(k.size());
  std::vector<std::size_t> who;
  std::vector<std::int64_t> num_rows, first, hidden_index;
  std::vector<std::int32_t> tokens;
  std::int64_t offset = 0;
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const std::int64_t rows = plan.hidden_rows.empty() ? 0 : plan.hidden_rows[i];
    const std::int64_t p = plan.first_position[i];
    auto& s = st.seqs.at(plan.sequences[i]);
    offset += rows;
    const bool settled = !s.lost && !s.mtp_lost && rows > 0 && s.mtp.num_tokens >= p - rows;
    if (!s.lost && rows > 0 && !settled) s.mtp_lost = true;  // rows before these were never seen
    if (!settled) {
      k[i] = 0;
      continue;
    }
    s.mtp.num_tokens = p - rows;  // the rows drafted past it are replaced
    for (std::int64_t j = p - rows + 1; j <= p; ++j) tokens.push_back(s.history[static_cast<std::size_t>(j)]);
    for (std::int64_t r = offset - rows; r < offset; ++r) hidden_index.push_back(r);
    who.push_back(i);
    num_rows.push_back(rows);
    first.push_back(p - rows);  // the MTP row of token j sits at position j - 1
  }
  if (who.empty()) return drafts;
  auto caches = [&](const std::vector<std::size_t>& ids) {
    std::vector<latent_cache*> out;
    for (auto i : ids) {
      auto& m = st.seqs.at(plan.sequences[i]).mtp;
      m.latents.resize(1);
      out.push_back(&m.latents[0]);
    }
    return out;
  };
  auto run = [&](const std::vector<std::size_t>& ids, const std::vector<std::int32_t>& toks, const tensor& hidden) {
    tensor t = tensor::empty({static_cast<std::int64_t>(toks.size())}, dtype::i32);
    std::copy(toks.begin(), toks.end(), t.data<std::int32_t>());
    const step_layout layout = step_layout::make(num_rows, first);
    tensor m = net.mtp_forward(t, hidden, layout, caches(ids), *st.mtp_blocks);
    for (std::size_t j = 0; j < ids.size(); ++j) st.seqs.at(plan.sequences[ids[j]]).mtp.num_tokens = first[j] + num_rows[j];
    const auto last = layout.last_rows();
    return net.gather(m, std::vector<std::int32_t>(last.begin(), last.end()));
  };
  std::vector<std::int32_t> index(hidden_index.begin(), hidden_index.end());
  tensor h = run(who, tokens, net.gather(net.compute().upload(plan.target_hidden, dtype::f32), index));
  // Drafting: round r predicts token p + r + 1 from the MTP hidden state of token p + r.
  std::vector<std::size_t> drafting;
  std::vector<std::int32_t> keep;
  for (std::size_t j = 0; j < who.size(); ++j)
    if (k[who[j]] > 0) drafting.push_back(who[j]), keep.push_back(static_cast<std::int32_t>(j));
  h = net.gather(h, keep);
  for (std::int64_t round = 0; !drafting.empty(); ++round) {
    pick_drafts(st, plan, drafting, net.compute().download(net.mtp_logits(h)), drafts, q_of);
    std::vector<std::size_t> next;
    keep.clear();
    tokens.clear();
    num_rows.clear();
    first.clear();
    for (std::size_t j = 0; j < drafting.size(); ++j) {
      const std::size_t i = drafting[j];
      if (k[i] <= round + 1) continue;
      next.push_back(i);
      keep.push_back(static_cast<std::int32_t>(j));
      tokens.push_back(drafts[i].back());
      num_rows.push_back(1);
      first.push_back(st.seqs.at(plan.sequences[i]).mtp.num_tokens);
    }
    if (next.empty()) break;
    h = run(next, tokens, net.gather(h, keep));
    drafting = std::move(next);
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
  for (auto& [id, s] : st.seqs) {
    s.cache = sequence_state{};
    s.mtp = sequence_state{};
    s.mtp_lost = true;  // the MTP head can only draft for sequences it has seen from their first step
  }
  std::cerr << "[draft] now drafting with '" << d.name << "' (" << d.dir << "), was '" << st.current.name << "'" << std::endl;
  st.previous_dir = st.current.dir;
  st.current = std::move(d);
}

std::string describe(const draft_state& st) {
  json_writer w;
  w.begin_object().key("draft").value(st.current.name).key("dir").value(st.current.dir);
  w.key("vocab_size").value(st.drafter().config().vocab_size);
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
          auto k = track(st, plan);
          plan.want_hidden = st.current.mtp;
          std::vector<std::vector<float>> q;
          if (st.current.mtp) {
            const auto drafts = mtp_drafts(st, plan, k, q);  // takes in the hidden states even when nobody drafts
            append_drafts(plan, drafts, q, st.current.name);
          } else if (std::any_of(k.begin(), k.end(), [](std::int64_t x) { return x > 0; })) {
            append_drafts(plan, draft_tokens(st, plan, k, q), q, st.current.name);
          } else {
            plan.draft_tokens.clear();
          }
          plan.hidden_rows.clear();
          plan.target_hidden = tensor();  // consumed here
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
