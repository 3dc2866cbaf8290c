// CAF inspect() overloads for the training messages. Include only from .cpp files.
#pragma once

#include <caf/meta/type_name.hpp>

#include "protocol/training_messages.hpp"

namespace troupe {

namespace train {
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, named_array& x) {
  return f(caf::meta::type_name("named_array"), x.name, x.shape, x.values);
}
}  // namespace train

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_micro_batch& x) {
  return f(caf::meta::type_name("train_micro_batch"), x.step, x.id, x.sequences, x.seq_len, x.tokens, x.targets, x.hidden,
           x.loss_weight, x.evaluate);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_gradient& x) {
  return f(caf::meta::type_name("train_gradient"), x.step, x.id, x.sequences, x.seq_len, x.grad);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, micro_batch_loss& x) {
  return f(caf::meta::type_name("micro_batch_loss"), x.step, x.id, x.replica, x.loss_sum, x.target_tokens, x.evaluate);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, gradient_share& x) {
  return f(caf::meta::type_name("gradient_share"), x.step, x.replica, x.grads, x.touched, x.load);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_update& x) {
  return f(caf::meta::type_name("step_update"), x.step, x.learning_rate, x.grad_scale);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, corpus_info& x) {
  return f(caf::meta::type_name("corpus_info"), x.tokens, x.train_sequences, x.validation_sequences, x.fingerprint);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, stage_snapshot& x) {
  return f(caf::meta::type_name("stage_snapshot"), x.values, x.moments);
}

}  // namespace troupe
