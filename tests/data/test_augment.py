import torch

from polytrain.data.augment import augment_images, draw_augmentation


def reference_shift(image, dy, dx, shift):
    """Pad by replication, then crop the window that moves the content by (dy, dx)."""
    padded = torch.nn.functional.pad(image[None], (shift,) * 4, mode="replicate")[0]
    height, width = image.shape[1:]
    return padded[:, shift - dy:shift - dy + height, shift - dx:shift - dx + width]


def test_shifts_and_flips_match_pad_and_crop():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 7, 9)
    choices = draw_augmentation(6, 2, True, seed=1, epoch=0)
    out = augment_images(x, choices, 2)
    for image, result, (dy, dx, flip) in zip(x, out, choices.tolist()):
        expected = reference_shift(image, dy, dx, 2)
        assert torch.equal(result, expected.flip(-1) if flip else expected)


def test_choices_depend_on_sample_and_epoch_not_on_sharding():
    choices = draw_augmentation(100, 3, True, seed=5, epoch=2)
    assert torch.equal(choices, draw_augmentation(100, 3, True, seed=5, epoch=2))
    assert not torch.equal(choices, draw_augmentation(100, 3, True, seed=5, epoch=3))
    assert choices[:, :2].abs().max() == 3 and set(choices[:, 2].tolist()) == {0, 1}
    assert draw_augmentation(100, 3, False, seed=5, epoch=2)[:, 2].abs().sum() == 0
