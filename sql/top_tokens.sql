-- Top-activating tokens of one feature: value, token, sample id, label, and a context window
-- with the token marked [[like this]] (WordPiece ## pieces are joined for display).
-- Ties in value are broken by token row.
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param feature INTEGER: feature index
-- @param n INTEGER = 20: rows to return
-- @param context INTEGER = 8: tokens shown on each side of the token
WITH top AS (
    SELECT row, value
    FROM features
    WHERE sae = $sae AND feature = $feature
    ORDER BY value DESC, row
    LIMIT $n
),
hit AS (
    SELECT top.row, top.value, t.sample, t.position, t.token
    FROM top JOIN tokens AS t ON t.row = top.row
),
win_rows AS (
    SELECT hit.row AS hit_row, hit.sample AS hit_sample, unnest(range(hit.row - $context, hit.row + $context + 1)) AS wrow
    FROM hit
),
win AS (
    SELECT
        wr.hit_row,
        w.position,
        CASE WHEN w.token LIKE '##%' THEN '' ELSE ' ' END
        || CASE WHEN w.row = wr.hit_row THEN '[[' ELSE '' END
        || CASE
            WHEN w.token LIKE '##%' THEN substr(w.token, 3)
            WHEN w.token LIKE 'Ġ%' OR w.token LIKE '▁%' THEN substr(w.token, 2)
            ELSE w.token
        END
        || CASE WHEN w.row = wr.hit_row THEN ']]' ELSE '' END AS piece
    FROM win_rows AS wr JOIN tokens AS w ON w.row = wr.wrow
    WHERE w.sample = wr.hit_sample
),
ctx AS (
    SELECT hit_row, ltrim(string_agg(piece, '' ORDER BY position)) AS context
    FROM win
    GROUP BY hit_row
)
SELECT
    row_number() OVER (ORDER BY hit.value DESC, hit.row) AS rank,
    hit.value,
    hit.token,
    s.id,
    s.label,
    ctx.context,
    hit.row,
    hit.sample,
    hit.position
FROM hit
JOIN samples AS s ON s.sample = hit.sample
JOIN ctx ON ctx.hit_row = hit.row
ORDER BY hit.value DESC, hit.row
