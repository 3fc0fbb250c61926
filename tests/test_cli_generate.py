"""`python -m infer.generate` end to end on the tiny SD folder."""
import numpy as np
import pytest
from PIL import Image

from infer import generate


@pytest.fixture(scope="module")
def tiny_dir(tiny_sd_dir):
    return tiny_sd_dir


def test_generate_writes_png_and_reports_times(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert generate.main(["--model", tiny_dir, "--prompt", "a cat", "--prompt", "a dog", "--height", "64",
                          "--width", "64", "--steps", "2", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 2 * 64 + 2, 3)  # a grid of the two images
    err = capsys.readouterr().err
    assert "compile" in err and "it/s" in err


def test_generate_rejects_bad_arguments(tiny_dir, tmp_path):
    with pytest.raises(SystemExit):
        generate.main(["--model", tiny_dir, "--out", str(tmp_path / "x.png")])  # no prompt
    with pytest.raises(ValueError, match="multiple of"):
        generate.main(["--model", tiny_dir, "--prompt", "a", "--height", "50", "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
