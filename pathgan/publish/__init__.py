"""``pathgan push``: a trained generator on the Hugging Face Hub, with its model card."""
