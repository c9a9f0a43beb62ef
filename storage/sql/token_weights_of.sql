select rationale_id, token_start, weights, keypoints
from token_weights
where token_weights_fp = $token_weights_fp;
