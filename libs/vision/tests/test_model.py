import pytest
import torch

from flywheel_vision.model import HEAD_PREFIX, DigitNet, load_compatible


@pytest.mark.parametrize("batch", [1, 7])
def test_forward_maps_a_batch_of_images_to_one_logit_per_class(batch: int) -> None:
    model = DigitNet(num_classes=10).eval()

    logits = model(torch.zeros(batch, 1, 28, 28))

    assert logits.shape == (batch, 10)


def test_the_model_is_small_enough_for_cpu_serving() -> None:
    parameters = sum(p.numel() for p in DigitNet(10).parameters())

    assert parameters < 150_000


def test_a_base_with_the_same_classes_is_loaded_whole() -> None:
    base, model = DigitNet(10), DigitNet(10)

    load_compatible(model, base.state_dict(), with_head=True)

    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_a_base_with_other_classes_gives_its_features_and_leaves_the_head_fresh() -> None:
    base, model = DigitNet(3), DigitNet(10)
    fresh_head = model.head.weight.detach().clone()

    load_compatible(model, base.state_dict(), with_head=False)

    assert torch.equal(model.features[0].weight, base.features[0].weight)
    assert torch.equal(model.head.weight, fresh_head)
    assert any(key.startswith(HEAD_PREFIX) for key in base.state_dict())


def test_a_state_of_another_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        load_compatible(DigitNet(10), {"other.weight": torch.zeros(1)}, with_head=True)
