"""``stagevar-train``: train the embedded model ``infinity-mini`` on the procedural toy scenes (phase 1
the BSQ VAE, phase 2 the transformer); evaluate, sweep, export, average and fine-tune weights.

No generation needs this package: it is the model's trainer, kept out of the runtime (``stagevar``).

Examples::

    # the shipped model: 92 minutes on 2 CPU cores, then resumed to 175 with --max-minutes 175
    # (re-running resumes from runs/mini/ckpt.pt; see stagevar/toy/weights/MODEL_CARD.md)
    stagevar-train --config training/configs/mini.yaml --out runs/mini

    # a 3-minute smoke run on a GPU
    stagevar-train --config training/configs/mini.yaml --out runs/smoke --max-minutes 3 --device cuda

    # continue trained weights on a GPU with larger batches (how the shipped weights were finished)
    stagevar-train --config training/configs/mini.yaml --init stagevar/toy/weights \
        --out runs/gpu --device cuda --max-minutes 5 --workers 12 --set train.batch=64 --set train.short_batch=128

    # average two weights directories of one VAE (how the shipped weights were made last:
    # 0.4 x the GPU-finished weights + 0.6 x a matched-prefix continuation)
    stagevar-train --average runs/step4 runs/matchc/final 0.6 --out runs/avg06

Data are drawn on the fly (never stored): prompts of the ``train`` split grammar
(:func:`stagevar.toy.prompts.make_split`, so no held-out combination is ever seen) and their
ground-truth scenes rendered at ``image_size``.

Phase 1 (``vae_minutes``): encoder -> multi-scale residual BSQ over the schedule (straight-through)
-> decoder, loss MSE + L1 in [-1, 1].

Phase 2 (the rest of ``max_minutes``): teacher forcing as upstream Infinity (README section E):
the frozen VAE gives the features, the bit labels of every scale come from the residual
quantisation, the inputs are the accumulated codes resized to the next scale, and the transformer
predicts all scales at once under the block-causal mask; loss = cross-entropy per bit (logit pairs).
With bitwise self-correction (upstream ``BitwiseSelfCorrection``): a random fraction of each
scale's bits is flipped before accumulating, and later scales' labels are re-quantised from the
corrupted sum, so the model learns to correct its own sampling errors. With a self-sampled prefix
(``self_prefix_scales`` > 0, off by default), a fraction ``self_prefix_prob`` of the rows takes the
EMA model's own sampled bits on the first scales instead (sampled scale by scale from its
teacher-forced prediction), so later scales learn to repair the coarse layouts the model really
draws, whose tokens are sampled independently of each other. With ``self_prefix_match`` = K,
those rows' scene is the nearest of K scenes of their prompt to the own prefix, and they learn
only the scales after it (``self_prefix_categories`` limits the rows to some prompt categories;
see the model card, step 5). Prompts are replaced by the
learned null text with probability ``cond_drop`` (classifier-free guidance). Half of the steps
(``short_prob``) train only the first ``short_scales`` scales (cheap, and those scales decide
layout, colour and count). An EMA of the transformer is kept and exported. With ``eval_minutes``
> 0, the EMA weights are judged every that many minutes of transformer training on
``eval_prompts`` calibration prompts (seed 0), and each result is a ``"phase": "eval"`` row of
``log.jsonl`` (its time is not counted against the budget); ``eval_steps`` > 0 does the same every
that many transformer steps.

Budgets are wall-clock minutes by default; ``vae_steps`` / ``max_steps`` > 0 bound the phases by
step counts instead (``--max-steps``), so that a run does the same work on any machine.

Outputs in ``--out``: ``ckpt.pt`` (atomic, every ``ckpt_minutes``; resumed automatically),
``log.jsonl`` (metrics), ``final/`` (``config.json`` + ``*.safetensors``, the EMA transformer) and
``final_raw/`` (the same with the raw transformer weights).

Modules: :mod:`~training.data` (the scene stream), :mod:`~training.targets` (teacher forcing),
:mod:`~training.loop` (the run), :mod:`~training.weights` (export, warm start, averaging),
:mod:`~training.decoder` (decoder fine-tuning), :mod:`~training.evaluation` (judging weights),
:mod:`~training.cli` (the command).
"""
from training.loop import train

__all__ = ["train"]
