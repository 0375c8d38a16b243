"""Moved to `mmser.training.ptapt.clustering` (P-TAPT step (b)); the names stay importable from here."""

from mmser.training.ptapt.clustering import (
                                             CENTROIDS_FILE,
                                             LABELS_FILE,
                                             META_FILE,
                                             assign_clusters,
                                             extract_frame_features,
                                             kmeans,
                                             load_pseudo_labels,
                                             make_pseudo_labels,
                                             read_meta,
)

__all__ = ["CENTROIDS_FILE", "LABELS_FILE", "META_FILE", "assign_clusters", "extract_frame_features", "kmeans",
           "load_pseudo_labels", "make_pseudo_labels", "read_meta"]
