"""Helpers of the lm-evaluation-harness task in this folder."""


def choice_records(dataset):
    """Keep the multiple-choice records of eval.jsonl (the others are held-out completions)."""
    return dataset.filter(lambda doc: doc.get("choices") is not None)
