import os

# the shared public eval files (GSM8K, MATH-500, AIME24, MBPP), beside the repository
EVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "eval")
