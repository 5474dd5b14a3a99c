"""What gptviz reads and writes: weights and checkpoints (:mod:`.weights`, :mod:`.checkpoints`,
:mod:`.checkpoint_config`), lessons (:mod:`.lesson`, :mod:`.lesson_format`) and the HTML report
(:mod:`.report`)."""
