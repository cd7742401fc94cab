"""Context attribution on the real default model: 15 distinct facts, a question about one, the answer given."""

import numpy as np
import pytest

import sparsetrace as st

pytestmark = pytest.mark.integration

FACTS = [
    "The capital of Veltria is the harbour city of Moradin.",
    "Olenka Brask won the national chess title in 1987.",
    "The river Tamsel freezes over every January.",
    "Doctor Ivo Renn discovered a blue variety of moss in the northern hills.",
    "The Kessler bridge is made of red granite and spans four hundred metres.",
    "Farmers in the Ardo valley grow mostly barley and rye.",
    "The old observatory on Mount Celm was closed in 1962.",
    "Captain Mara Loy sailed the schooner Petrel around the cape in 1904.",
    "The annual lantern festival in Quill takes place in late October.",
    "The Gorven mine produced copper until its tunnels flooded.",
    "Professor Tilde Amsel wrote the first dictionary of the island dialect.",
    "The train from Moradin to Esk takes exactly three hours.",
    "A rare white owl nests in the bell tower of Saint Aubin.",
    "The Vantor family has run the town bakery for six generations.",
    "The secret code for the museum vault is 4-7-1-9.",
]
CASES = [  # (supporting fact, query, response)
    (7, "Who sailed the schooner Petrel around the cape?", "Captain Mara Loy sailed the Petrel around the cape."),
    (14, "What is the secret code for the museum vault?", "The code for the museum vault is 4-7-1-9."),
    (0, "What is the capital of Veltria?", "The capital of Veltria is Moradin."),
    (4, "What is the Kessler bridge made of?", "The Kessler bridge is made of red granite."),
]


def test_the_supporting_fact_ranks_in_the_top_3(default_model):
    model, tokenizer = default_model
    context = " ".join(FACTS)
    for fact, query, response in CASES:
        result = st.attribute(model, tokenizer, context, query, st.StreamConfig(k=2, block_size=16),
                              response=response, method="max_head", progress=False)
        assert [s.text for s in result.sources] == FACTS
        assert result.mass.shape == (30, 9, 15) and result.trace.stats()["sparsity"] > 0.5
        assert FACTS[fact] in [s.text for s in result.top(3)], (query, result.scores)
        assert np.all(result.mass.sum(-1) <= 1 + 1e-5)
