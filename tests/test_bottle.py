"""Quality on the real MVTec AD bottle category (runs where ../shared/data exists, skips elsewhere)."""
import pytest

from edgecore.data.datasets import ImageStream, train_samples
from edgecore.evaluation import evaluate, load_test_set
from edgecore.model import FitConfig, fit

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def bottle_model(bottle):
    images = [rgb for _, rgb in ImageStream(train_samples(bottle))]
    return fit(images, FitConfig(backbone="efficientnet_lite0", device="cpu"))


def test_lite0_on_bottle_meets_the_published_quality(bottle_model, bottle):
    result, _ = evaluate(bottle_model, load_test_set(bottle, bottle_model.preprocess_config))
    assert result["images"] == 83
    assert result["image_auroc"] >= 0.99
    assert result["pixel_auroc"] >= 0.975
    # the threshold comes from normal images only and must still separate the classes well
    assert result["at_threshold"]["recall"] >= 0.95
    assert result["at_threshold"]["fp"] <= 3
