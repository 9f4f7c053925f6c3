import numpy as np
import pytest

from hf_vl.data.example_images import EXAMPLE_IMAGES, load_example_image


@pytest.mark.parametrize("name", EXAMPLE_IMAGES)
def test_example_images_are_real_rgb_photographs(name):
    image = load_example_image(name)
    assert image.mode == "RGB" and min(image.size) >= 256
    pixels = np.asarray(image, dtype=np.float32)
    # a photograph, not a placeholder: many distinct values in every channel
    assert all(len(np.unique(pixels[..., c])) > 100 for c in range(3))


def test_unknown_example_image_names_the_choices():
    with pytest.raises(ValueError, match="astronaut"):
        load_example_image("lena")
