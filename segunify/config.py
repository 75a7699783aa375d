"""SegUnify configuration: a typed dataclass. The slides give the architecture and the EMA rate; where they leave a
value open, the default is the choice documented in segunify/README.md ("Choices the slides leave open")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from segunify.losses import PartnerTerm
from shared.config_ranges import non_negative, positive, probability, ranged, resume_may_differ
from shared.run_config import RunConfig


@dataclass
class SegUnifyConfig(RunConfig):
    dataset: str = "potsdam3"  # the dataset with reported numbers
    nns_dir: str = resume_may_differ("")  # "" = beside the feature cache: <cache_dir>/../nns

    # Compressor.
    code_dim: int = ranged(70, 1)
    nonlinear: bool = True

    # Correspondence objective (STEGO's Potsdam ViT-S values: the slides give none).
    weight_self: float = non_negative(0.67)
    weight_knn: float = non_negative(0.25)
    weight_random: float = non_negative(0.63)
    shift_self: float = 0.08
    shift_knn: float = 0.02
    shift_random: float = 0.46
    feature_samples: int = ranged(11, 1)
    random_partners: int = ranged(5, 1)
    # The kNN partner is drawn uniformly from the 7 nearest neighbours (never the image itself; the kNN file holds
    # 30 entries, the image first, so at most 29).
    knn_top: int = ranged(7, 1, 29)

    # Labeler.
    n_extra_clusters: int = ranged(0, 0)
    n_local_sets: int = ranged(1, 1)  # the slides' "future scope": several local sets feeding one global set
    ema: float = probability(0.99)  # alpha of C_global <- alpha C_global + (1 - alpha) C_local
    # Where the centres start: "kmeans" = directions from cosine k-means on the first batch's code (lengths from the
    # Xavier-normal draw); "xavier" = the slides' Xavier-normal draw alone. See segunify/README.md.
    centre_init: Literal["kmeans", "xavier"] = "kmeans"
    centre_init_iters: int = ranged(10, 1)  # Lloyd iterations of that k-means
    temperature: float = positive(1.0)  # of the local cosine logits in the agreement cross-entropy
    energy_weight: float = non_negative(10.0)  # of the cosine k-means energy (the agreement term has weight 1)
    labeler_trains_compressor: bool = False  # True: the labeler's loss also reaches the compressor
    alpha: float = positive(2.0)  # exported logits = alpha * cos(code, global centres)

    # Optimisation: one Adam per part.
    lr_compressor: float = positive(5e-4)
    lr_labeler: float = positive(5e-3)
    lr_linear: float = positive(5e-3)
    lr_schedule: Literal["constant", "poly_restarts"] = "constant"
    poly_power: float = non_negative(0.9)
    restart_every: int = ranged(0, 0)  # steps per polynomial cycle; 0 = one cycle over max_steps (no restart)
    batch_size: int = ranged(16, 1)
    max_steps: int = ranged(5000, 1)
    linear_label_stride: int = ranged(4, 1)  # the linear probe (a diagnostic) scores every 4th label pixel; 1 = all

    def partner_terms(self) -> dict[str, PartnerTerm]:
        return {"self": PartnerTerm(self.weight_self, self.shift_self),
                "knn": PartnerTerm(self.weight_knn, self.shift_knn),
                "random": PartnerTerm(self.weight_random, self.shift_random)}
