"""The names driver and engines share: the old-log-prob pass's flag and the per-token fields.

Engine-side code (engine_hooks.py, megatron_capture.py, worker.py, capture.py) imports names from
here, never from ``driver`` (which imports TransferQueue and the trainer's helpers).
"""

from __future__ import annotations

# extra_info / non-tensor key the driver sets on the old-log-prob pass only: the JSON ShearSettings.
# Its presence is what switches the SHEAR capture on in the actor engines.
SHEAR_FLAG = "shear"
FLAG_KEY = SHEAR_FLAG  # the name every engine hook reads it by

# Fields the workers write (nested per sample, response tokens only, old_log_probs row convention).
WEIGHTS_KEY = "shear_weights"  # nested [b, response_len_i] float32: SHEAR token weights
STATS_KEY = "shear_stats"  # [b, len(worker.STATS_COLUMNS)] float32: per-group counters
HIDDEN_KEY = "shear_hidden"  # model_output only, never leaves the worker: nested [b, response_len_i, H]

# A field verl's own V1 old-log-prob pass writes to the TransferQueue (calculate_entropy=True,
# trainer_base._compute_old_log_prob): the old policy's token entropy at the rollout temperature,
# response tokens only, [b, response_len_i].
ENTROPY_KEY = "entropy"

# OAR-G (baselines/oar_g.py): the old-log-prob pass's flag (JSON OarGSettings) and what the workers write.
OAR_FLAG = "oar_g"
OAR_SALIENCY_KEY = "oar_g_saliency"  # nested [b, response_len_i] float32: I_t on reasoning tokens, 0 elsewhere
OAR_REASONING_KEY = "oar_g_reasoning"  # nested [b, response_len_i] float32: 1 on the reasoning tokens
OAR_STATS_KEY = "oar_g_stats"  # [b, 3] float32: answer span found, answer marker found, seconds
