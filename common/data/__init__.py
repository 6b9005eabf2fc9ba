"""Data: the competition tables and their validation, folds, datasets and transforms (:mod:`.competition`),
the generated demo (:mod:`.demo`), detector datasets and crops (:mod:`.detection`), and the artefacts one
stage leaves for the next (:mod:`.artefacts`)."""
