"""The tasks: the built-in task with its gold reward (reviews.py), and the paper's data sets and your
own files (corpora.py), read into the records the pipeline's data stage writes."""
