"""The names the pipeline, serving, the Makefile and the scripts share: each is spelled here and nowhere else.

Standard library only, so that make and shell can read a name with the system's Python before any virtualenv
exists: `python3 names.py MODEL_NAME` prints it (the Makefile and scripts/services.sh do).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The registered model, unless MODEL_NAME says otherwise.
MODEL_NAME = "California_Housing_Regression"

# Aliases: what serving loads, the version a promotion replaced (what `make rollback` goes back to), and the version
# that serves in shadow beside the champion until `make bake` decides (promotions move it while BAKE_S > 0).
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
CANDIDATE = "candidate"
CANDIDATE_SINCE = "candidate_since"  # the version tag: when the candidate alias moved to it (UTC), where a bake starts

# The version tag that says how a version reached production, and its values. Serving loads only TRUSTED_PROMOTIONS,
# and only once their signature verifies; REVOKED (`make revoke`) takes a version out of service.
PROMOTION_TAG = "promotion"
BY_GATE, BY_PERSON, REJECTED, REVOKED = "gate", "human", "rejected", "revoked"
TRUSTED_PROMOTIONS = (BY_GATE, BY_PERSON)

# Beside a promoted version's files: the evidence its promotion signed, and the signature (serving/signature.py).
EVIDENCE_FILE = "promotion.json"
SIGNATURE_FILE = "model.sig"
# Where `make retrain` keeps the promotion's private key locally (created on first use, mode 600), and its public
# half, which serving trusts by default (MODEL_SIGNING_KEY, MODEL_VERIFY_KEYS).
SIGNING_KEY = Path(".services/model-signing.key")
VERIFY_KEY = Path(".services/model-signing.pub")

# The model's input fields, in the CSV's order (features.py builds the model's inputs from them), and the
# endpoints that answer only on ADMIN_PORT when it is set (serving/admin.py).
NUMERIC_FEATURES = (
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
)
CATEGORICAL_FEATURE = "ocean_proximity"
CATEGORIES = ("<1H OCEAN", "INLAND", "ISLAND", "NEAR BAY", "NEAR OCEAN")
FEATURES = (*NUMERIC_FEATURES, CATEGORICAL_FEATURE)
OPTIONAL_FEATURES = frozenset({"total_bedrooms"})
TARGET = "median_house_value"
COLUMNS = (*FEATURES[:-1], TARGET, CATEGORICAL_FEATURE)  # the CSV's column order
ADMIN_PATHS = frozenset({"/reload", "/metrics"})

# Files of the pipeline: what DVC versions the data by (the champion must come from the data it names), and the
# gate's decision of the current run.
DVC_LOCK = Path("dvc.lock")
DECISION = Path("reports/decision.json")
DECISION_TABLE = Path("reports/decision.md")


def model_name() -> str:
    """MODEL_NAME from the environment; set but empty counts as unset (a workflow passes an unset variable so)."""
    return os.environ.get("MODEL_NAME") or MODEL_NAME


if __name__ == "__main__":
    print(globals()[sys.argv[1]])
