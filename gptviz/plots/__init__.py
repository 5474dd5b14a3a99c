"""Pure plotly figures, one module per view family (no gradio): the shared look (:mod:`.style`),
the parameters (:mod:`.params`), generation (:mod:`.generation`), the Inside view
(:mod:`.inside`), "Why this token?" (:mod:`.explain`) and the head-role atlas (:mod:`.heads`)."""
