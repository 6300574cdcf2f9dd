"""Geometry: mesh normals and connectivity, region weights, rotations, point-to-surface distance
and per-view visibility.

The public functions of the submodules are re-exported here, so ``tempeh.geometry.vertex_normals``
and ``tempeh.geometry.point_to_surface`` are the functions. Note that the package attributes
``point_to_surface`` and ``visibility`` therefore name the FUNCTIONS, shadowing the submodules of
the same name; reach the modules with ``from tempeh.geometry.point_to_surface import ...`` or
``importlib.import_module("tempeh.geometry.visibility")``.
"""
from tempeh.geometry.mesh_ops import (face_normals, face_vertices, k_ring,
                                      laplacian_smoothing_offsets, mesh_laplacian_uniform,
                                      unique_edges, vertex_adjacency, vertex_normals)
from tempeh.geometry.regions import (COARSE_EDGE_WEIGHTS, DEFAULT_EDGE_RINGS, EDGE_WEIGHT_ORDER,
                                     EYEBALLS_ONLY_VERTEX_WEIGHTS, PRETRAIN_VERTEX_WEIGHTS,
                                     REFINE_EDGE_WEIGHTS, VERTEX_WEIGHT_ORDER, WEIGHT_GROUPS,
                                     edge_vertex_weights, edge_weights, vertex_weights)
from tempeh.geometry.rotations import (axis_angle_to_matrix, euler_to_matrix, matrix_to_rot6d,
                                       quaternion_to_matrix, random_rotations, rot6d_to_matrix)
from tempeh.geometry.point_to_surface import (closest_faces, closest_points,
                                              point_to_surface, point_triangle_distance_sq,
                                              safe_sqrt)
from tempeh.geometry.visibility import (embree_available, occluded_segments, raycast_first_hit,
                                        visibility)

__all__ = [
    # mesh_ops
    "face_vertices", "face_normals", "vertex_normals", "unique_edges", "vertex_adjacency", "k_ring",
    "mesh_laplacian_uniform", "laplacian_smoothing_offsets",
    # regions
    "WEIGHT_GROUPS", "VERTEX_WEIGHT_ORDER", "EDGE_WEIGHT_ORDER", "DEFAULT_EDGE_RINGS",
    "PRETRAIN_VERTEX_WEIGHTS", "EYEBALLS_ONLY_VERTEX_WEIGHTS", "COARSE_EDGE_WEIGHTS",
    "REFINE_EDGE_WEIGHTS", "vertex_weights", "edge_vertex_weights", "edge_weights",
    # rotations
    "rot6d_to_matrix", "matrix_to_rot6d", "random_rotations", "quaternion_to_matrix",
    "axis_angle_to_matrix", "euler_to_matrix",
    # point_to_surface
    "point_to_surface", "point_triangle_distance_sq", "closest_points", "closest_faces",
    "safe_sqrt",
    # visibility
    "visibility", "raycast_first_hit", "occluded_segments", "embree_available",
]
