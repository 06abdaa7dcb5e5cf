"""``stagevar-calibrate bench``: the full model, the searched policies and the published baselines, side by side.

For one model, in one process:

* **latency** - every method generates the same batch (prompt encoding done once beforehand and
  excluded; VAE decoding included) with ``Runtime(..., synchronize=True)``: one warm-up round,
  then ``--repeats`` rounds interleaved (full, m1, m2, ..., full, m1, m2, ...); median and p90 per
  method; speedup = the full model's median / the method's median, same run;
* **peak memory** of one generation per method: on CUDA ``torch.cuda.max_memory_allocated``
  (weights included); on CPU the peak of the tensor memory allocated through PyTorch's CPU
  allocator during the generation (weights excluded), from ``torch.profiler`` memory events;
  ``n/a`` where neither is available;
* **quality vs the full model** (unless ``--no-quality``): ``--prompts`` held-out prompts x
  ``--seeds`` seeds, every image compared with the full model's image of the same prompt and seed:
  SSIM and high-frequency energy ratio (:mod:`calibrate.metrics`), the worst prompt (lowest SSIM);
  for the embedded model ``infinity-mini`` also the analytic evaluator's score per category.

Methods: ``full`` (no policy), every operating point of every searched policy (``--policy``, or by
default the files in ``policies/`` whose ``model.name`` is the model), and the baselines of
:mod:`stagevar.baselines` (``--baselines``). With several ``--engine`` values every method runs on
every engine (``name@engine``), interleaved in the same rounds; the speedup is then taken against
the full model on the first engine listed, and ``speedup_same_engine`` against the full model on
the method's own engine. The warm-up round's time per method is reported as the first
generation's latency (it includes the capture on ``graphs``).

Writes ``OUT/bench.md`` (the table printed on stdout), ``OUT/bench.json`` and, unless
``--no-plot``, ``OUT/quality_vs_speedup.png`` (``OUT/speedup.png`` with ``--no-quality``). Progress
goes to stderr.

It runs as ``python3 -m calibrate.bench`` too, without the package installed (``PYTHONPATH=.``)
and, with ``--no-quality --no-plot``, with the runtime's dependencies only (no optuna, scipy or
matplotlib). Modules: :mod:`~calibrate.bench.methods` (what is compared),
:mod:`~calibrate.bench.measure` (latency, memory, quality), :mod:`~calibrate.bench.report` (table,
JSON, plot), :mod:`~calibrate.bench.cli` (the command).
"""
