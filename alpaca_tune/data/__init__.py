"""Training data: records (load + validate), prompt templates, tokenization, micro-batches.

Serving uses the prompt templates and encode_prompt too, so a prompt is rendered and tokenized
the same way in training and at prediction time.
"""
