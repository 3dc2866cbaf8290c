// The LongCat-Flash(-Lite) forward pass: n-gram embedding, ScMoE blocks of MLA + dense
// SwiGLU + routed experts, final norm and head (spec: model.md sections 2-5).
//
// One path serves prefill and decode: every step appends the new tokens' compressed latents to
// each sequence's cache and attends over it with kv_b absorbed. Invariant: feeding a sequence
// in any number of steps gives the logits of one full prefill (up to float rounding) and
// exactly the same n-gram ids, because the N-gram cache and the latent cache travel with the
// sequence_state.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/latent_cache.hpp"
#include "model/ngram_hash.hpp"
#include "model/weights.hpp"

namespace troupe {

/// Everything the model keeps for one live sequence between steps (the single-process path;
/// in the actor graph each stage keeps its own share: the n-gram context, its layers' caches).
struct sequence_state {
  ngram_context ngram;                // the N-gram cache: last N-1 tokens of the current segment
  std::vector<latent_cache> latents;  // per attention layer; blocks are freed with the state
  std::int64_t num_tokens = 0;        // tokens already in the caches
};

/// One sequence's share of a step: its state and the tokens it adds.
struct step_input {
  sequence_state* state;
  std::span<const std::int32_t> tokens;
};

enum class logits_mode : std::uint8_t { last_token, all_tokens };

/// Which rows of a step belong to which sequence, and each row's position. Built once per step
/// by whoever plans it (the scheduler, or forward()) and shared by every stage of the step.
struct step_layout {
  std::vector<std::int64_t> row_begin, num_rows, first_position;  // per sequence
  std::int64_t total_rows = 0;
  tensor positions;  // i64 [T], host
  tensor row_seq;    // i32 [T], host: the sequence each row belongs to

  /// Sequence i contributes num_rows[i] rows starting at position first_position[i].
  static step_layout make(std::span<const std::int64_t> num_rows, std::span<const std::int64_t> first_position);
  std::size_t num_sequences() const { return row_begin.size(); }
  /// The row of each sequence's last token.
  std::vector<std::int64_t> last_rows() const;
  /// positions and row_seq on `be`'s device, uploaded on first use: once per step, however many
  /// layers ask. (A layout belongs to the one actor or call that made it.)
  const tensor& positions_on(backend& be) const;
  const tensor& row_seq_on(backend& be) const;

 private:
  mutable tensor positions_device_, row_seq_device_;
};

/// A block's routing for one step: per router expert (routed then zero experts), the rows it
/// takes and their gate weights, in row order.
struct moe_routing {
  std::vector<std::vector<std::int32_t>> rows;
  std::vector<std::vector<float>> gates;
};

/// The first half of a ScMoE block: a = h + MLA_0(RMS(h)), u = RMS(a) (u feeds the MoE).
struct block_front {
  tensor a, u;
};

class model {
 public:
  model(model_config config, model_weights weights, backend& be);
  ~model();

  /// Loads `dir` (config.json + safetensors) onto `be`; `tables`: where the embedding and
  /// n-gram tables live (model/weights.hpp).
  static std::unique_ptr<model> load(const std::filesystem::path& dir, backend& be,
                                     table_placement tables = table_placement::host);

  const model_config& config() const { return config_; }
  backend& compute() const { return be_; }

  /// Runs one step for a batch of sequences and returns float32 host logits:
  /// [num_sequences, V] for last_token, [total new tokens, V] for all_tokens.
  tensor forward(std::span<const step_input> batch, logits_mode mode);
  /// The argmax (lowest id on ties) of each row forward() would return, picked where the logits
  /// are: a GPU sends back ids, not rows of V. Greedy decoding without a penalty (the draft's
  /// steps, greedy verification) needs nothing else.
  std::vector<std::int32_t> forward_argmax(std::span<const step_input> batch, logits_mode mode);

  /// Greedy drafting: `steps` forward_argmax(last_token) steps, the first feeding each
  /// sequence's tokens and each later one the pick before it; returns each sequence's `steps`
  /// picks. The caches end holding the fed tokens and every pick but the last, as that loop leaves
  /// them. Where steps replay (a GPU, every table on the device), all the steps are one replay:
  /// each pick feeds the next step on the device and the picks come back once.
  std::vector<std::vector<std::int32_t>> draft_greedy(std::span<const step_input> batch, std::int64_t steps);

  /// The n-gram ids the step would use for `tokens` after `context` (diagnostics and tests).
  std::vector<std::int64_t> ngram_ids(std::span<const std::int32_t> tokens, ngram_context context) const;
  /// Moves an N-gram cache past `tokens` (rebuilding it after a rollback).
  void advance_ngram(ngram_context& context, std::span<const std::int32_t> tokens) const;
  /// The N-gram cache after a whole sequence `tokens` (reads only its last N-1 tokens).
  ngram_context ngram_after(std::span<const std::int32_t> tokens) const;

  // The pieces forward() is made of; the actor graph calls the same ones from its stages.

  /// Embedding of a step's tokens (i32 [T]); advances each sequence's n-gram context.
  tensor embed(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts);
  /// A step's tokens embedded where the tables are (all on the backend's device), with no host
  /// transfer, so a recording can hold it: `ngram`, where given (one token per sequence, a model
  /// with n-gram tables), hashes tokens (i32 [T]) as its slots' next tokens into ngram_ids
  /// (i64 [E, T]); otherwise ngram_ids already holds the ids (hashed on the host). Then the
  /// gathers (rows: the same tokens as i64), projections and amplification.
  tensor embed_on_device(device_ngram* ngram, const tensor& tokens, const tensor& token_rows, tensor& ngram_ids);
  /// a and u of block `block`; appends the step's latents to caches[i] (attention layer
  /// 2*block), taking new blocks from `blocks` as needed.
  block_front block_front_half(std::int64_t block, const tensor& h, const step_layout& layout,
                               std::span<latent_cache* const> caches, latent_block_allocator& blocks);
  /// c + MLP_1(RMS(c)) with c = b + MLA_1(RMS(b)), b = a + MLP_0(u): the block without its MoE
  /// term (attention layer 2*block+1 uses caches). The block's output is this plus moe(u).
  tensor block_back_half(std::int64_t block, const block_front& front, const step_layout& layout,
                         std::span<latent_cache* const> caches, latent_block_allocator& blocks);
  /// The router of block `block`: softmax, biased top-k, scaled gates.
  moe_routing route(std::int64_t block, const tensor& u);
  /// The SwiGLU of routed expert `expert` (< n_routed_experts) of block `block` on rows x.
  tensor expert_forward(std::int64_t block, std::int64_t expert, const tensor& x);
  /// out[rows] += gates * y for one router expert's rows (zero experts pass u's rows as y).
  void combine(const moe_routing& routing, std::int64_t expert, const tensor& y, tensor& out);
  /// The whole MoE of a block in this process: route, every expert, combine.
  tensor moe(std::int64_t block, const tensor& u);
  /// out (=|+=) the MoE of u.
  void moe(std::int64_t block, const tensor& u, tensor& out, write_mode mode);
  /// Final norm and lm_head over rows of hidden states: device logits [rows, V].
  tensor head(const tensor& h);
  /// Whether the checkpoint has an MTP head (model.mtp.*).
  bool has_mtp() const { return !weights_.mtp.empty(); }
  /// The MTP head (spec section 6) over one step's rows: row r takes token tokens[r] and the
  /// target's hidden state (before the final norm) at the position before it, and sits at
  /// MTP position (token position - 1) in `caches` (its one MLA layer). Returns the MTP hidden
  /// states [T, H]; mtp_logits() turns them into predictions of the token after tokens[r], and
  /// the hidden state of row r stands in for the target's when drafting further.
  tensor mtp_forward(const tensor& tokens, const tensor& hidden, const step_layout& layout,
                     std::span<latent_cache* const> caches, latent_block_allocator& blocks);
  /// The MTP head's norm and the shared lm_head: device logits [rows, V].
  tensor mtp_logits(const tensor& m);
  /// Rows `rows` of x (i64 host list) as a new tensor.
  tensor gather(const tensor& x, std::span<const std::int32_t> rows);

  /// Whether forward() replays recorded decode steps (CUDA graphs) where the backend records
  /// and a step has at most routed_moe_rows() rows; on by default. Off: every op is dispatched
  /// from the host each step (the baseline the bench compares against).
  void set_recorded_steps(bool on) { recorded_steps_ = on; }

 private:
  struct recorded_step;
  struct recorded_draft;

  /// Claims the blocks `cache` needs to hold rows more tokens after first_position; returns how
  /// many blocks those tokens span.
  static std::int64_t claim_blocks(latent_cache& cache, std::int64_t first_position, std::int64_t rows,
                                   latent_block_allocator& blocks);
  /// Writes the addresses of the first `count` blocks of `cache` to out[0..count) (a block-table row).
  static void block_addresses(const latent_cache& cache, std::int64_t count, std::int64_t* out);
  /// The step's place in one attention layer's caches: claims the blocks its new rows need and
  /// uploads the block table.
  paged_latents page(const step_layout& layout, std::span<latent_cache* const> caches, latent_block_allocator& blocks);
  tensor attention(const mla_weights& w, const tensor& x, const paged_latents& cache);
  /// With `moe`, the block before's MoE term is first added into h (by the norm that reads h).
  block_front front_half(std::int64_t block, const tensor& h, const paged_latents& cache, const tensor* moe = nullptr);
  tensor back_half(std::int64_t block, const block_front& front, const paged_latents& cache);
  /// Every block over embedded rows h: the final hidden states [T, H] (before the final norm).
  /// `pages(a)` gives attention layer a's place in the caches.
  tensor blocks(tensor h, const std::function<paged_latents(std::int64_t)>& pages);
  /// forward()'s step, its logits left where they were computed; `rows` gets the row of them
  /// each of forward()'s rows is (a recorded step scores every row; forward() keeps the last).
  tensor step_logits(std::span<const step_input> batch, logits_mode mode, std::vector<std::int64_t>& rows);
  /// forward()'s decode path: the step's inputs go into a recorded step's buffers and it replays
  /// (recorded on first use for this number of rows). Logits [T, V] on the device, in the
  /// recording's output (the next replay overwrites them).
  tensor forward_recorded(const tensor& tokens, const step_layout& layout, std::span<const step_input> batch,
                          std::span<ngram_context* const> contexts);
  /// draft_greedy()'s replay: the steps recorded once per (first step's rows, sequences, steps).
  std::vector<std::vector<std::int32_t>> draft_recorded(std::span<const step_input> batch, std::int64_t steps);
  /// Whether the embedding and every n-gram table live on the backend's device (a recording can
  /// then hold the embedding).
  bool tables_on_device() const;
  /// Throws input_error when a sequence's state plus `rows` more tokens passes max_position_embeddings.
  void check_room(const sequence_state& state, std::int64_t rows) const;
  /// How many keys a recording's block tables hold for sequences of up to `need` tokens.
  std::int64_t recorded_keys(std::int64_t need) const;
  /// Claims the blocks each sequence's rows[i] tokens from first[i] need in every attention layer
  /// and writes the block tables: host i64 [layers * stride, max_blocks], sequence i of layer a
  /// in row a * stride + i.
  tensor claim_tables(std::span<const step_input> batch, std::span<const std::int64_t> first,
                      std::span<const std::int64_t> rows, std::int64_t stride, std::int64_t max_blocks);
  tensor swiglu(const swiglu_weights& w, const tensor& x);
  /// y (=|+=) SwiGLU MLP of x: the down projection writes or adds into y.
  void swiglu(const swiglu_weights& w, const tensor& x, tensor& y, write_mode mode);
  float eps() const;  // rms_norm_eps as the ops take it
  tensor norm(const tensor& x, const tensor& w);
  tensor embed_unamplified(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts);
  /// The n-gram ids of a step's tokens, table-major (host i64 [E, T]: each table's ids
  /// contiguous, as ngram_embed takes them); advances each sequence's context.
  tensor hash_ngrams(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts);
  /// The embedding amplification of the config (spec section 2), in place.
  void amplify(tensor& embedded);
  /// tokens (i32, host) as i64 row ids; input_error for an id outside the vocabulary.
  tensor token_ids(const tensor& tokens) const;

  model_config config_;
  model_weights weights_;
  backend& be_;
  ngram_hasher hasher_;
  rope_params rope_;
  float softmax_scale_;
  tensor inv_freq_;                       // rope_.inv_freq on the backend's device
  latent_block_allocator plain_blocks_;  // forward()'s blocks (unbounded; freed with each sequence_state)
  bool recorded_steps_ = true;
  std::map<std::int64_t, std::unique_ptr<recorded_step>> recorded_;  // by 3 * rows + where the embedding runs
  std::map<std::array<std::int64_t, 3>, std::unique_ptr<recorded_draft>> recorded_drafts_;  // by rows, sequences, steps
};

}  // namespace troupe
