// The typed interfaces of the inference graph's actors: each line is one message an actor
// accepts and what it answers. CAF-version-specific spellings stay in this folder.
// Include only from .cpp files (CAF headers are heavy).
#pragma once

#include <caf/atom.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <string>
#include <vector>

#include "protocol/messages.hpp"
#include "protocol/serialization.hpp"  // every sender of these messages must see inspect()

namespace troupe {

using forward_atom = caf::atom_constant<caf::atom("forward")>;
using moe_atom = caf::atom_constant<caf::atom("moe")>;
using experts_atom = caf::atom_constant<caf::atom("experts")>;
using free_atom = caf::atom_constant<caf::atom("free")>;
using generate_atom = caf::atom_constant<caf::atom("generate")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using metrics_atom = caf::atom_constant<caf::atom("metrics")>;
using token_atom = caf::atom_constant<caf::atom("token")>;
using done_atom = caf::atom_constant<caf::atom("done")>;
// Rewiring after the supervisor restarts an actor: the new handle goes to whoever sends to it.
using new_next_atom = caf::atom_constant<caf::atom("newnext")>;      // stage_actor successor
using new_router_atom = caf::atom_constant<caf::atom("newrouter")>;  // router_actor
using new_shard_atom = caf::atom_constant<caf::atom("newshard")>;    // expert_shard_actor of a shard index
using new_entry_atom = caf::atom_constant<caf::atom("newentry")>;    // embedding_actor
using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>;
using encode_atom = caf::atom_constant<caf::atom("encode")>;
using decode_atom = caf::atom_constant<caf::atom("decode")>;
using flush_atom = caf::atom_constant<caf::atom("flush")>;
using actor_down_atom = caf::atom_constant<caf::atom("actordown")>;  // a graph actor died (supervisor -> scheduler)
using load_draft_atom = caf::atom_constant<caf::atom("loaddraft")>;
using rollback_atom = caf::atom_constant<caf::atom("rollback")>;
using draft_info_atom = caf::atom_constant<caf::atom("draftinfo")>;

/// Embedding, attention stages and head: run a step from here to the end of the graph.
/// The embedding takes the plan, every later stage the hidden states; all answer with the
/// step's sampled tokens (each stage delegates onward, the head replies).
/// Every later stage, and the head (the last stage), which replies.
using stage_actor = caf::typed_actor<
    caf::replies_to<forward_atom, hidden_batch>::with<step_result>,  // my blocks, then the rest
    caf::reacts_to<free_atom, std::vector<seq_id>>,                   // drop these sequences' KV caches
    caf::reacts_to<new_next_atom, caf::actor>,                        // my successor (a stage_actor) restarted
    caf::reacts_to<new_router_atom, caf::actor>>;                     // the router (a router_actor) restarted

using embedding_actor = caf::typed_actor<
    caf::replies_to<forward_atom, step_plan>::with<step_result>,   // embed, then run the rest
    caf::reacts_to<free_atom, std::vector<seq_id>>,                 // drop these sequences' n-gram caches
    caf::reacts_to<new_next_atom, caf::actor>>;                     // my successor (a stage_actor) restarted

/// Speculative decoding's entry: drafts tokens for the sequences of a plan that may draft,
/// then hands the plan (drafts appended) to the embedding. Keeps the draft model and each
/// sequence's draft cache. Swapping drafts happens between two steps (messages run one at a
/// time), so every step is drafted by one model.
using draft_actor = caf::typed_actor<
    caf::replies_to<forward_atom, step_plan>::with<step_result>,  // draft, then run the rest
    caf::reacts_to<free_atom, std::vector<seq_id>>,                // drop these sequences' draft caches
    caf::reacts_to<new_next_atom, caf::actor>,                     // the embedding restarted
    caf::replies_to<load_draft_atom, std::string>::with<std::string>,  // checkpoint dir -> "now drafting with ..."
    caf::replies_to<rollback_atom>::with<std::string>,                 // back to the previous draft (reloaded)
    caf::replies_to<draft_info_atom>::with<std::string>>;              // the current draft, as a JSON object

/// The router of every MoE block: picks experts per row, sends each shard only its rows,
/// combines the gated outputs (zero experts locally, without messages).
using router_actor = caf::typed_actor<
    caf::replies_to<moe_atom, std::int32_t, tensor>::with<tensor>,  // (block, u [T,H]) -> moe [T,H]
    caf::reacts_to<new_shard_atom, std::int64_t, caf::actor>,       // shard i (an expert_shard_actor) restarted
    caf::reacts_to<heartbeat_atom>>;                                // (to itself) time to check remote shards

/// One shard of experts (a range of expert ids, every block).
using expert_shard_actor = caf::typed_actor<
    caf::replies_to<experts_atom, expert_batch>::with<tensor>,  // -> y [rows, H] in the batch's order
    caf::replies_to<heartbeat_atom>::with<std::int64_t>>;       // alive? -> first expert of the shard

}  // namespace troupe

namespace troupe {

/// The scheduler: continuous batching over the graph. Subscribers receive
/// (token_atom, request id, token) per generated token and (done_atom, request_done) once.
using scheduler_actor = caf::typed_actor<
    caf::replies_to<generate_atom, generate_request, caf::actor>::with<bool>,  // queued, or an error saying why not
    caf::reacts_to<cancel_atom, std::string>,                                   // cancel by request id
    caf::reacts_to<new_entry_atom, caf::actor>,                                 // the embedding restarted
    caf::reacts_to<actor_down_atom, std::string, bool>,                         // who died and why; did it hold sequence state
    caf::replies_to<metrics_atom>::with<scheduler_metrics>>;                    // counters for /metrics

}  // namespace troupe

namespace troupe {

/// Text <-> ids, with one streaming decoder per request so streamed text never splits a UTF-8
/// character.
using tokenizer_actor = caf::typed_actor<
    caf::replies_to<encode_atom, std::string, bool>::with<std::vector<std::int32_t>>,  // (text, parse specials) -> ids
    caf::replies_to<decode_atom, std::string, std::int32_t>::with<std::string>,        // (request id, token) -> newly final text
    caf::replies_to<flush_atom, std::string>::with<std::string>>;                      // end of a request's stream: held-back bytes

}  // namespace troupe
