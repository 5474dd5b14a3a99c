"""Step-through generation: one visitor's session (:mod:`.session`), how it reads the model and
what it keeps (:mod:`.reads`), several visitors' steps in one forward (:mod:`.batching`), and the
sampling distribution (:mod:`.sampling`)."""
