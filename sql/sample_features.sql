-- The features active on one sample: for each, its maximum over the sample's tokens, the number
-- of tokens it is active on, its summed activation and the token at the maximum.
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param sample INTEGER: sample index (the samples view's sample column)
-- @param n INTEGER = 50: features to return, strongest first
WITH span AS (
    SELECT first_row, first_row + n_tokens AS stop_row
    FROM samples
    WHERE sample = $sample
),
act AS (
    SELECT f.feature, f.value, f.row
    FROM features AS f, span
    WHERE f.sae = $sae AND f.row >= span.first_row AND f.row < span.stop_row
)
SELECT
    act.feature,
    max(act.value) AS max_value,
    count(*) AS n_active,
    sum(act.value) AS sum_value,
    arg_max(t.token, act.value) AS top_token,
    arg_max(t.position, act.value) AS top_position
FROM act JOIN tokens AS t ON t.row = act.row
GROUP BY act.feature
ORDER BY max_value DESC, act.feature
LIMIT $n
