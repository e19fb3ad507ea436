"""Generation: the model as it is decoded, and the loop that decodes many prompts.

Evaluation and serving both go through here, so what is served is decoded as it was evaluated.
"""
