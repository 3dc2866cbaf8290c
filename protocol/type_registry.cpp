#include "protocol/type_registry.hpp"

#include <caf/actor_system_config.hpp>

#include "protocol/interfaces.hpp"
#include "protocol/serialization.hpp"
#include "protocol/training_interfaces.hpp"

namespace troupe {

void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<tensor>("troupe::tensor");
  cfg.add_message_type<sampling_params>("troupe::sampling_params");
  cfg.add_message_type<std::vector<sampling_params>>("std::vector<troupe::sampling_params>");
  cfg.add_message_type<step_plan>("troupe::step_plan");
  cfg.add_message_type<hidden_batch>("troupe::hidden_batch");
  cfg.add_message_type<expert_batch>("troupe::expert_batch");
  cfg.add_message_type<step_result>("troupe::step_result");
  cfg.add_message_type<generate_request>("troupe::generate_request");
  cfg.add_message_type<request_done>("troupe::request_done");
  cfg.add_message_type<draft_metrics>("troupe::draft_metrics");
  cfg.add_message_type<std::vector<draft_metrics>>("std::vector<troupe::draft_metrics>");
  cfg.add_message_type<scheduler_metrics>("troupe::scheduler_metrics");
  cfg.add_message_type<std::vector<seq_id>>("std::vector<troupe::seq_id>");
  cfg.add_message_type<std::vector<std::int32_t>>("std::vector<int32_t>");
  cfg.add_message_type<std::vector<std::int64_t>>("std::vector<int64_t>");
  cfg.add_message_type<std::vector<float>>("std::vector<float>");
  cfg.add_message_type<train_micro_batch>("troupe::train_micro_batch");
  cfg.add_message_type<train_gradient>("troupe::train_gradient");
  cfg.add_message_type<micro_batch_loss>("troupe::micro_batch_loss");
  cfg.add_message_type<gradient_share>("troupe::gradient_share");
  cfg.add_message_type<step_update>("troupe::step_update");
  cfg.add_message_type<stage_snapshot>("troupe::stage_snapshot");
  cfg.add_message_type<corpus_info>("troupe::corpus_info");
  cfg.add_message_type<std::vector<caf::actor>>("std::vector<caf::actor>");
}

}  // namespace troupe
