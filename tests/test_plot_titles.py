"""A run's figures are titled with the run's name, not the temporary directory it is written in."""

import matplotlib.figure
import matplotlib.axes

from gradsparse.config import load_config
from gradsparse.experiments.runner import run


def test_figures_are_titled_with_the_run_name(tmp_path, monkeypatch):
    titles = []
    real_suptitle, real_set_title = matplotlib.figure.Figure.suptitle, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, *a, **k: (titles.append(t), real_suptitle(self, t, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: (titles.append(t), real_set_title(self, t, *a, **k))[1])
    cfg = load_config({"name": "titled", "steps": 20, "progress": False, "plots": True,
                       "algorithm": {"compressor": {"kind": "topk", "k": 2}},
                       "metrics": {"every": 5, "names": ["loss", "mean_memory_norm", "density"]}})
    out = run(cfg, tmp_path / "titled")
    assert (out / "loss.png").is_file()
    assert titles and set(titles) == {"titled"}, titles
