"""What the model did and why: attribution, logit lens and saliency (:mod:`.explain`), head roles
(:mod:`.heads`), the Inside view's numbers (:mod:`.inside`) and the shape tracer (:mod:`.shapes`).
Domain functions that return numbers and tables; the views write the words."""
