"""The demo training job: a real, small GRPO run on CPU that rlmon watches.

A character-level policy (:mod:`rlmon.demo.model`) learns to answer one-digit additions in a fixed
format (:mod:`rlmon.demo.task`): the prompt ``7+5=`` wants the completion ``<answer>12</answer>``.
:mod:`rlmon.demo.train_grpo` is the entry point::

    torchrun --nproc_per_node 2 -m rlmon.demo.train_grpo            # about a minute on 2 cores
    torchrun --nproc_per_node 2 -m rlmon.demo.train_grpo --inject kl_blowup --inject_step 20

This package needs torch; the rest of rlmon does not import it.
"""
