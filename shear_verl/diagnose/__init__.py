"""Does the signal exist for my model? The paper's diagnostic (Sections 2, 5.1, Appendix K).

Continuation success of rollout prefixes against the span distance of the prefix's last span to
the opposing group; ``python -m shear_verl.diagnose --help``. See docs/diagnose.md.
"""

from shear_verl.diagnose.stats import binned_auc, continuation_success, prefix_positions, shift_events, spearman

__all__ = ["binned_auc", "continuation_success", "prefix_positions", "shift_events", "spearman"]
