"""Task vectors (fine-tuned minus pre-trained image-tower weights), bank folders, low-rank banks and the embedded bank's training."""
