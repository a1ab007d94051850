"""For programs that only load adapters (consumers): the corpus of cases, the check of a consumer's results per
requirement (consumer_check) and the shipped consumers (consumers/). docs/consumers.md."""
