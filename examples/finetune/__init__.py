"""The main job's parts (``examples/finetune_llama.py`` is the command users run):
``arguments`` (flags and their checks), ``corpus`` (data and model loading), ``steps``
(schedule, optimizer with ``--clip``, the compiled step and its memory), ``training``
(the loop, checkpoints, resume) and ``report`` (figures, printout, plot, report JSON,
the fine-tuned checkpoint)."""
