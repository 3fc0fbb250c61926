"""`make demo` (python -m infer.demo) runs and writes its files."""
import json

from infer import demo


def test_demo_writes_face_analysis(tmp_path):
    assert demo.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["faces"]["faces"] == 6
    assert (tmp_path / "faces.png").stat().st_size > 10_000
    report = (tmp_path / "faces.md").read_text()
    assert report.count("in a neutral expression") == 6
