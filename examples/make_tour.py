"""Build and execute ``examples/erf_tour.ipynb`` (nbformat + nbclient): ``python examples/make_tour.py``.

The notebook walks through the calls a researcher makes, on sizes small enough to run in well
under a minute on two CPU cores.
"""
from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "erf_tour.ipynb")

CELLS = [
    ("md", "# A tour of `erf`\n\nEffective receptive fields (Luo et al., NIPS 2016) of PyTorch networks: measure, fit, "
           "compare with the theory and with the theoretical receptive field (TRF), compare pooling modules, and "
           "swap the pooling of a torchvision ResNet. Small sizes throughout, so the notebook runs in seconds on a CPU."),
    ("code", "%matplotlib inline\nimport warnings\nwarnings.filterwarnings(\"ignore\", message=\"IProgress not found\")\nimport numpy as np\nimport torch\nimport matplotlib.pyplot as plt\nimport erf\n"
             "from erf import theory\nfrom erf.nets import conv_stack, pooling_net, swap_pooling\n"
             "torch.set_num_threads(2)"),
    ("md", "## 1. The ERF of a uniform linear stack equals the multinomial theory\n"
           "Ten 3x3 convolutions with all weights 1: the ERF of the centre unit is the outer product of the "
           "coefficients of (1 + x + x²)¹⁰, and its sigma is sqrt(10 · 8/12)."),
    ("code", "r = erf.effective_rf(conv_stack(10), (1, 33, 33), init=\"ones\", reduce=\"mean\", n_inputs=1,\n"
             "                     dtype=torch.float64, progress=False)\n"
             "prof = np.array(theory.binomial_profile(10, 3), dtype=float)\n"
             "window = r.map[6:27, 6:27]\n"
             "print(\"max |map - theory| :\", np.abs(window - np.outer(prof, prof)).max())\n"
             "print(\"sigma (moments)    :\", r.moments.sigma, \" theory:\", theory.gaussian_sigma([theory.Layer.uniform(3)] * 10))\n"
             "print(\"TRF                :\", r.trf.size, \" ERF size:\", round(r.metrics['erf_size'], 2))"),
    ("md", "## 2. A random ReLU network: fit, metrics and the TRF\n"
           "The canonical pooling network (three stages of two 3x3 convs + max pooling) at 3x96x96, "
           "averaged over 4 weight draws x 8 Gaussian inputs."),
    ("code", "def max_net():\n    return pooling_net(\"max\")\n"
             "res = erf.effective_rf(max_net, (3, 96, 96), n_inputs=8, draws=4, progress=False)\n"
             "fit = res.fit\n"
             "print(res)\n"
             "print(\"fit sigma:\", fit.sigma.round(2), \" r2:\", round(fit.r2, 3))\n"
             "m = res.metrics\n"
             "print(\"ERF size:\", round(m['erf_size'], 1), \" ERF/TRF:\", round(m['erf_trf_ratio']['overall'], 3),\n"
             "      \" area ratios:\", {k: round(v, 4) for k, v in m['area_ratio'].items() if v})\n"
             "print(res.trf.to_text().splitlines()[1])"),
    ("code", "fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout=\"constrained\")\n"
             "res.plot(ax=axes[0])\nres.plot(ax=axes[1], log=True)\nplt.show()"),
    ("md", "## 3. Uncertainty: standard errors and the difference of two maps\n"
           "Every map carries its per-position standard error; `erf.diff` gives a z-score map. "
           "Two runs over disjoint weight draws of the same network merge into one run."),
    ("code", "more = erf.effective_rf(max_net, (3, 96, 96), n_inputs=8, draws=4, first_draw=4,\n"
             "                        progress=False)\n"
             "both = res.merge(more)\n"
             "print(\"maps:\", both.n, \" draw ranges:\", both.config[\"draw_ranges\"])\n"
             "d = erf.diff(res, more, normalize=True)\n"
             "print(f\"same network, independent draws: max |z| = {d.max_abs_z:.2f}, |z| > 3 at {100 * d.frac_significant:.2f} % of the support\")"),
    ("md", "## 4. Compare pooling modules\n"
           "`erf.compare` runs independent groups of weight draws per module; numbers come from the merged "
           "map and their standard errors from the delete-one-group jackknife. `erf compare` on the command "
           "line does all 22 modules at 3x128x128."),
    ("code", "comp = erf.compare([\"max\", \"avg\", \"blur\", \"spectral\"], input_shape=(3, 96, 96), groups=3, draws=1,\n"
             "                   n_inputs=4, progress=False)\n"
             "from IPython.display import Markdown\nMarkdown(comp.to_markdown())"),
    ("code", "comp.plot_grid()"),
    ("md", "## 5. Swap the pooling of a torchvision ResNet\n"
           "`swap_pooling` replaces every downsampling pooling layer (and, with `convs=True`, every strided "
           "convolution) of an existing network in place; the ERF of a `layer2` unit before and after:"),
    ("code", "import torchvision\n"
             "def resnet(pool=None):\n"
             "    m = torchvision.models.resnet18(weights=None)\n"
             "    return swap_pooling(m, pool) if pool else m\n"
             "kw = dict(layer=\"layer2\", n_inputs=4, draws=2, progress=False)\n"
             "base = erf.effective_rf(resnet, (3, 96, 96), **kw)\n"
             "soft = erf.effective_rf(lambda: resnet(\"softpool\"), (3, 96, 96), **kw)\n"
             "for name, r in ((\"maxpool\", base), (\"softpool\", soft)):\n"
             "    print(f\"{name:9s} TRF {r.trf.size}  sigma {r.moments.sigma.round(2)}  ERF size {r.metrics['erf_size']:.1f}\")\n"
             "fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout=\"constrained\")\n"
             "base.plot(ax=axes[0]).set_title(\"resnet18 layer2 unit, max pooling\", fontsize=9)\n"
             "soft.plot(ax=axes[1]).set_title(\"resnet18 layer2 unit, SoftPool\", fontsize=9)\nplt.show()"),
    ("md", "## 6. Save and reload\nResults are `.npz` files with JSON metadata, reloaded without pickle."),
    ("code", "import tempfile, os\n"
             "path = res.save(os.path.join(tempfile.mkdtemp(), \"max.npz\"))\n"
             "again = erf.load(path)\n"
             "print(np.array_equal(again.map, res.map), again.config[\"draws\"], again.trf.size)"),
    ("md", "## 7. The ERF through training\n"
           "`erf.train` trains a classifier on a generated task (`erf.tasks`: shapes, stretched, tiled, zoomed, "
           "marks) and measures the ERF of its last feature map at epoch 0 and every `erf_every` epochs, on "
           "held-out task images and on Gaussian inputs; learned pooling parameters (here DynOPool's scale r) "
           "are recorded with it. `erf.studies.luo2016()`, `trained_pools()` and `dynopool()` run the full studies."),
    ("code", "from erf.nets import pooling_classifier\n"
             "torch.manual_seed(0)\n"
             "model = pooling_classifier(\"dynopool\", classes=4, depth=2, width=8)\n"
             "run = erf.train(model, \"stretched\", epochs=2, erf_every=1, n_train=256, n_test=64, size=24,\n"
             "                batch_size=16, pool_lr=0.02, erf_n=4)\n"
             "cols = [\"epoch\", \"loss\", \"test_acc\", \"erf_size_task\", \"sigma_row_task\", \"sigma_col_task\",\n"
             "        \"features.stage0.pool.r_h\", \"features.stage0.pool.r_w\"]\n"
             "Markdown(run.to_markdown(cols))"),
    ("code", "run.plot()"),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


def execute(nb: nbformat.NotebookNode, cwd: str = HERE, timeout: int = 300) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    return nb


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    notebook = execute(build())
    tmp = PATH + ".tmp"
    nbformat.write(notebook, tmp)
    os.replace(tmp, PATH)
    print(f"wrote {PATH} ({time.perf_counter() - t0:.1f} s)")
